"""Task generators and readers: determinism, sizes, positions, answers re-derived independently."""
import json
import re
from collections import defaultdict

import pytest

from perk_fast.readers import read_examples, write_jsonl
from perk_fast.tasks import POSITIONS, TASKS, Example, byte_length, generate, render_record

TEXT_TASKS = ("needle", "qa1", "qa2", "qa3")
RECORD_TASKS = ("records_recall", "records_relation", "records_aggregate")

MOVE = re.compile(r"^(\w+) (?:went|moved|travelled|journeyed) to the (\w+)\.$")
GRAB = re.compile(r"^(\w+) (?:picked up|got|grabbed) the (\w+)\.$")
DROP = re.compile(r"^(\w+) (?:dropped|put down|left) the (\w+)\.$")
RECORD = re.compile(
    r"^Student <(\d+)>, Name: ([A-Z][a-z]+ [A-Z][a-z]+), Year: (Freshman|Sophomore|Junior|Senior), "
    r"School: (School of [A-Za-z ]+), Major: ([A-Za-z ]+), Grade: (\d{1,3})$")


def sep_of(task):
    return "\n" if task.startswith("records") else " "


def flat(ex, task):
    """The context as the generator measures it: units joined by their separator, plus one."""
    return sep_of(task).join(ex.context) + sep_of(task)


def sentences(ex):
    return [s.strip() for doc in ex.context for s in re.findall(r"[^.]+\.", doc)]


def story(ex):
    """The story facts of a qa example, in context order (filler must never match)."""
    return [s for s in sentences(ex) if MOVE.match(s) or GRAB.match(s) or DROP.match(s)]


def simulate(facts):
    """Independent bAbI world model: person places and each object's location history."""
    where, holder, history = {}, {}, defaultdict(list)
    for s in facts:
        if m := MOVE.match(s):
            person, place = m.groups()
            where[person] = place
            for obj, who in holder.items():
                if who == person:
                    history[obj].append(place)
        elif m := GRAB.match(s):
            person, obj = m.groups()
            assert person in where, f"{person} picks up {obj} before being anywhere"
            holder[obj] = person
            history[obj].append(where[person])
        elif m := DROP.match(s):
            person, obj = m.groups()
            assert holder.pop(obj) == person
    return where, history


def parse_records(ex):
    rows = []
    for doc in ex.context:
        for line in doc.split("\n"):
            m = RECORD.match(line)
            assert m, f"bad record line {line!r}"
            rows.append(dict(zip(("id", "name", "year", "school", "major", "grade"), m.groups())))
    return {r["id"]: r for r in rows}


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("task", TASKS)
def test_deterministic_per_seed(task):
    a = generate(task, 3, seed=7, context_tokens=1024)
    assert a == generate(task, 3, seed=7, context_tokens=1024)
    assert a[:2] == generate(task, 2, seed=7, context_tokens=1024)  # example i does not depend on n
    assert a != generate(task, 3, seed=8, context_tokens=1024)
    assert len({(e.question, e.answer, tuple(e.context)) for e in a}) == 3  # examples differ


# ----------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("context_tokens", [1024, 3000])
@pytest.mark.parametrize("task", TASKS)
def test_context_length_and_documents(task, context_tokens):
    doc_tokens = 200
    for ex in generate(task, 8, seed=1, context_tokens=context_tokens, doc_tokens=doc_tokens):
        total = sum(byte_length(d) for d in ex.context)
        assert ex.meta["context_tokens"] == total
        assert abs(total - context_tokens) <= 0.1 * context_tokens
        # Tighter: within about half a filler unit (sentences <= 45 bytes, records <= 135), less
        # one separator per document.
        half_unit = 23 if task in TEXT_TASKS else 68
        assert -half_unit - len(ex.context) <= total - context_tokens <= half_unit
        for doc in ex.context:
            units = doc.split(sep_of(task)) if task in RECORD_TASKS else re.findall(r"[^.]+\.", doc)
            assert byte_length(doc) <= doc_tokens or len(units) == 1
        assert ex.meta["task"] == task and ex.meta["seed"] == 1


def test_custom_token_counter():
    words = lambda s: len(s.split())  # noqa: E731
    for ex in generate("qa2", 3, seed=0, context_tokens=400, count_tokens=words, doc_tokens=60):
        total = sum(words(d) for d in ex.context)
        assert abs(total - 400) <= 40 and ex.meta["context_tokens"] == total
        assert all(words(d) <= 60 for d in ex.context)


# ----------------------------------------------------------------------------- positions
@pytest.mark.parametrize("position", ["pre", "mid", "post"])
@pytest.mark.parametrize("task", TASKS)
def test_position_puts_relevant_facts_in_the_third(task, position):
    third = POSITIONS.index(position)
    for ex in generate(task, 6, seed=3, context_tokens=2048, position=position, with_support=True):
        text = flat(ex, task)
        lo, hi = len(text) * third / 3, len(text) * (third + 1) / 3
        relevant = story(ex) if task in ("qa1", "qa2", "qa3") else ex.support
        for fact in relevant:
            starts = [m.start() for m in re.finditer(re.escape(fact), text)]
            assert starts, f"{fact!r} missing from the context"
            for s in starts:
                assert lo <= s and s + len(fact) <= hi, (fact, s, lo, hi)
        assert lo <= ex.meta["depth"] * len(text) <= hi


def test_random_position_spreads():
    depths = [e.meta["depth"] for e in generate("needle", 40, seed=0, context_tokens=1024)]
    assert min(depths) < 1 / 3 and max(depths) > 2 / 3


def test_same_story_at_every_position():
    by_pos = {p: generate("qa3", 2, seed=4, context_tokens=1024, position=p) for p in POSITIONS}
    for p in POSITIONS:
        assert [(e.question, e.answer, story(e)) for e in by_pos[p]] == \
               [(e.question, e.answer, story(e)) for e in by_pos["pre"]]


# ----------------------------------------------------------------------------- answers
def test_needle_answer_is_in_the_needle():
    exs = generate("needle", 8, seed=2, context_tokens=1024, n_distractors=3, with_support=True)
    for ex in exs:
        name = re.fullmatch(r"What is the secret code of (\w+)\?", ex.question).group(1)
        assert ex.support == [f"The secret code of {name} is {ex.answer}."]
        codes = dict(re.findall(r"The secret code of (\w+) is (\d+)\.", " ".join(ex.context)))
        assert len(codes) == 4 and codes[name] == ex.answer
        assert len(set(codes.values())) == 4 and re.fullmatch(r"\d{4}", ex.answer)


@pytest.mark.parametrize("task", ["qa1", "qa2", "qa3"])
def test_babi_answer_matches_simulation(task):
    for ex in generate(task, 60, seed=5, context_tokens=1536, n_distractors=6):
        facts = story(ex)
        assert len(facts) == ex.meta["n_facts"]  # filler never looks like a fact
        where, history = simulate(facts)
        if task == "qa1":
            person = re.fullmatch(r"Where is (\w+)\?", ex.question).group(1)
            assert where[person] == ex.answer
        elif task == "qa2":
            obj = re.fullmatch(r"Where is the (\w+)\?", ex.question).group(1)
            assert history[obj][-1] == ex.answer
        else:
            obj, place = re.fullmatch(r"Where was the (\w+) before the (\w+)\?", ex.question).groups()
            assert history[obj].count(place) == 1
            assert history[obj][history[obj].index(place) - 1] == ex.answer


@pytest.mark.parametrize("task", ["qa1", "qa2", "qa3"])
def test_babi_support_is_the_right_chain(task):
    for ex in generate(task, 12, seed=6, context_tokens=1536, n_distractors=6):
        facts = story(ex)
        assert len(ex.support) == int(task[-1])
        # the support facts appear in context order (list.index raises otherwise)
        at = -1
        for s in ex.support:
            at = facts.index(s, at + 1)
        person = (MOVE.match(ex.support[0]) or GRAB.match(ex.support[0])).group(1)
        mine = [s for s in facts if s.startswith(person + " ")]
        if task == "qa1":
            assert ex.support == [[s for s in mine if MOVE.match(s)][-1]]
            assert MOVE.match(ex.support[0]).group(2) == ex.answer
        elif task == "qa2":
            obj = re.fullmatch(r"Where is the (\w+)\?", ex.question).group(1)
            grab, move = ex.support
            assert GRAB.match(grab).groups() == (person, obj)
            assert move == [s for s in mine if MOVE.match(s)][-1]
            assert MOVE.match(move).groups() == (person, ex.answer)
        else:
            obj, place = re.fullmatch(r"Where was the (\w+) before the (\w+)\?", ex.question).groups()
            to_origin, grab, to_place = ex.support
            assert MOVE.match(to_origin).groups() == (person, ex.answer)
            assert GRAB.match(grab).groups() == (person, obj)
            assert MOVE.match(to_place).groups() == (person, place)
            # the three are consecutive events of that person: a genuine 3-hop chain
            i = mine.index(grab)
            assert mine[i - 1] == to_origin and mine[i + 1] == to_place


def test_records_rendering():
    rec = {"Student Id": "3109998", "Student Name": "Alison Keith", "Year": "Sophomore",
           "School": "School of Engineering", "Major": "Physics", "Grade": "72"}
    assert render_record(rec) == ("Student <3109998>, Name: Alison Keith, Year: Sophomore, "
                                  "School: School of Engineering, Major: Physics, Grade: 72")
    for task in RECORD_TASKS:
        for ex in generate(task, 3, seed=0, context_tokens=1024, doc_tokens=300):
            db = parse_records(ex)  # every line matches the format
            assert len(db) == ex.meta["n_records"]  # ids are unique


@pytest.mark.parametrize("task", RECORD_TASKS)
def test_records_answers_recomputed_from_context(task):
    for ex in generate(task, 20, seed=9, context_tokens=2048, with_support=True):
        db = parse_records(ex)
        ids = re.findall(r"student (\d+)", ex.question)
        kind = ex.meta["kind"]
        if task == "records_recall":
            field = {"name": "name", "year": "year", "school": "school", "major": "major",
                     "grade": "grade"}[kind]
            assert db[ids[0]][field] == ex.answer
        elif task == "records_relation":
            a, b = db[ids[0]], db[ids[1]]
            truth = int(a["grade"]) > int(b["grade"]) if kind == "grade" else a[kind] == b[kind]
            assert ex.answer == ("Yes" if truth else "No")
        else:
            school = re.search(r"the (School of [A-Za-z ]+?)( have|\?)", ex.question)
            if kind == "count_major":
                major = re.fullmatch(r"How many students study ([A-Za-z ]+)\?", ex.question).group(1)
                group = [r for r in db.values() if r["major"] == major]
            else:
                group = [r for r in db.values() if r["school"] == school.group(1)]
            grades = [int(r["grade"]) for r in group]
            if kind == "count_grade_above":
                threshold = int(re.search(r"above (\d+)", ex.question).group(1))
                truth = sum(g > threshold for g in grades)
            else:
                truth = {"count_school": len(group), "count_major": len(group),
                         "max_grade": max(grades), "min_grade": min(grades)}[kind]
            assert ex.answer == str(truth)
            assert sorted(ex.support) == sorted(render_record_from(r) for r in group)
    answers = [e.answer for e in generate("records_relation", 40, seed=1, context_tokens=1024)]
    assert 10 <= answers.count("Yes") <= 30  # balanced


def render_record_from(row):
    return render_record({"Student Id": row["id"], "Student Name": row["name"], "Year": row["year"],
                          "School": row["school"], "Major": row["major"], "Grade": row["grade"]})


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("call, field", [
    (lambda: generate("qa4", 1), "task='qa4'"),
    (lambda: generate("qa1", 1, position="middle"), "position='middle'"),
    (lambda: generate("needle", 1, context_tokens=0), "context_tokens=0"),
    (lambda: generate("needle", -1), "n=-1"),
    (lambda: generate("needle", 1, doc_tokens=0), "doc_tokens=0"),
    (lambda: generate("needle", 1, n_distractors=10), "n_distractors=10"),
    (lambda: generate("qa1", 1, n_people=1), "n_people=1"),
    (lambda: generate("records_recall", 1, fields=["age"]), "fields="),
    (lambda: generate("qa3", 1, context_tokens=300, position="pre"), "context_tokens=300"),
])
def test_invalid_parameters(call, field):
    with pytest.raises(ValueError, match=re.escape(field) + ".*allowed"):
        call()


# ----------------------------------------------------------------------------- readers
BABI_ROW = {"context": ["doc one.", "Mary went to the garden."], "question": "Where is Mary?",
            "answer": "garden", "support": ["Mary went to the garden."]}
RECORDS_ROW = {
    "database_id": "db7",
    "database": [
        {"Student Id": "11", "Student Name": "Ann Lee", "Year": "Junior", "School": "School of Science",
         "Major": "Physics", "Grade": "90"},
        {"Student Id": "12", "Student Name": "Bo Kim", "Year": "Senior", "School": "School of Business",
         "Major": "Finance", "Grade": 55},
    ],
    "questions": [{"question": "What is the grade of student 12?", "answer": 55},
                  {"question": "Are student 11 and student 12 in the same school?", "answer": "No"}],
}
GORILLA_ROW = {"context": ["<api>a()</api> d1", "<api>b()</api> d2"], "location": "pre",
               "prompt": "Instruction: call b", "api_call": "b()"}


def write(path, rows, jsonl):
    with open(path, "w") as f:
        if jsonl:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
        else:
            json.dump(rows, f)
    return path


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_read_babilong(tmp_path, jsonl):
    path = write(tmp_path / ("b.jsonl" if jsonl else "b.json"), [BABI_ROW, BABI_ROW], jsonl)
    exs = read_examples(path)
    assert len(exs) == 2
    assert exs[0].context == BABI_ROW["context"] and exs[0].support == BABI_ROW["support"]
    assert (exs[0].question, exs[0].answer) == ("Where is Mary?", "garden")
    assert exs[1].meta["format"] == "babilong" and exs[1].meta["row"] == ("line 2" if jsonl else "index 1")


def test_read_single_object_json(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps(GORILLA_ROW))
    (ex,) = read_examples(path)
    assert (ex.question, ex.answer, ex.meta["position"]) == ("Instruction: call b", "b()", "pre")
    assert ex.context == GORILLA_ROW["context"] and ex.support is None


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_read_student_records(tmp_path, jsonl):
    path = write(tmp_path / ("r.jsonl" if jsonl else "r.json"), [RECORDS_ROW], jsonl)
    exs = read_examples(path)
    assert [e.answer for e in exs] == ["55", "No"]
    assert exs[0].context == [
        "Student <11>, Name: Ann Lee, Year: Junior, School: School of Science, Major: Physics, Grade: 90",
        "Student <12>, Name: Bo Kim, Year: Senior, School: School of Business, Major: Finance, Grade: 55"]
    assert exs[1].meta["database_id"] == "db7" and exs[1].meta["question_index"] == 1
    (grouped,) = {tuple(e.context) for e in read_examples(path, doc_tokens=1000)}
    assert grouped == ("\n".join(exs[0].context),)


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_read_longgorilla_and_explicit_format(tmp_path, jsonl):
    row = {"context": "one long document", "question": "q?", "answer": "a"}
    path = write(tmp_path / ("g.jsonl" if jsonl else "g.json"), [GORILLA_ROW, row], jsonl)
    exs = read_examples(path, format="longgorilla")
    assert exs[1].context == ["one long document"] and exs[1].answer == "a"
    with pytest.raises(ValueError, match="format='gorilla'"):
        read_examples(path, format="gorilla")


@pytest.mark.parametrize("rows, jsonl, where, field", [
    ([BABI_ROW, BABI_ROW, {k: v for k, v in BABI_ROW.items() if k != "answer"}], True, "line 3", "'answer'"),
    ([BABI_ROW, {**BABI_ROW, "context": "not a list"}], False, "index 1", "'context'"),
    ([{**BABI_ROW, "support": ["ok", 3]}], True, "line 1", "'support[1]'"),
    ([{**RECORDS_ROW, "questions": [{"question": "q"}, {"answer": "a"}]}], True, "line 1", "'questions[0].answer'"),
    ([BABI_ROW, {**RECORDS_ROW, "database": [{"Student Id": "1"}]}], False, "index 1", "'database[0].Student Name'"),
    ([BABI_ROW, {"text": "?"}], True, "line 2", "<row>"),
    ([BABI_ROW, ["a", "list"]], False, "index 1", "<row>"),
])
def test_malformed_rows_name_file_row_field(tmp_path, rows, jsonl, where, field):
    path = write(tmp_path / ("bad.jsonl" if jsonl else "bad.json"), rows, jsonl)
    with pytest.raises(ValueError) as err:
        read_examples(path)
    msg = str(err.value)
    assert str(path) in msg and where in msg and f"field {field}" in msg, msg


def test_invalid_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(BABI_ROW) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 2: .*invalid JSON"):
        read_examples(path)


def test_write_jsonl_round_trip(tmp_path):
    exs = [e for task in TASKS for e in generate(task, 2, seed=3, context_tokens=1024,
                                                 with_support=task != "needle")]
    exs.append(Example(context=["ünïcode ☃"], question="q", answer="a"))
    assert any(e.support is None for e in exs) and any(e.support for e in exs)
    write_jsonl(exs, tmp_path / "out.jsonl")
    assert read_examples(tmp_path / "out.jsonl") == exs
