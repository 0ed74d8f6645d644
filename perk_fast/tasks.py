"""Seeded, offline generators for PERK's long-context reasoning tasks.

Every generator returns ``list[Example]``: a context (a list of documents, the unit PERK writes
into its LoRA memory), a question and a short answer. Three families, as in the paper:

* ``needle`` -- needle in a haystack: one key-value fact ("The secret code of Mary is 4821.")
  among filler sentences (optionally among distractor needles with other names).
* ``qa1`` / ``qa2`` / ``qa3`` -- BabiLong-like 1-, 2- and 3-hop stories of people moving between
  places and carrying objects, hidden in filler text; ``support`` holds the facts the answer
  follows from.
* ``records_recall`` / ``records_relation`` / ``records_aggregate`` -- Drops-in-the-Ocean student
  records, one line per student (``render_record``), asked to recall a field, compare two students
  (Yes/No), or aggregate over a school or major (counts, highest / lowest grade).

Shared parameters:

* ``context_tokens`` -- target size of the whole context, counted with ``count_tokens``
  (default ``byte_length``, which equals the length of ``ByteTokenizer.encode``). A context lands
  within about half a filler unit of the target (~20 tokens for text, ~65 for records), less one
  separator per document. pre/mid/post need the relevant units to fit in a third: the stories
  take ~150-350 tokens, so use ``context_tokens`` >= 1024 (or fewer ``n_distractors``).
* ``position`` -- where the relevant units (needle, story facts, asked-about records) lie:
  "pre" / "mid" / "post" put all of them inside the first / middle / last third of the context's
  tokens; "random" anywhere. ``meta["depth"]`` is the token fraction before the first of them,
  ``meta["facts_tokens"]`` the tokens they take together (with their separators).
* ``doc_tokens`` -- documents are filled greedily with whole sentences (records) up to this
  many tokens; a single unit longer than that is a document of its own.

Determinism: example ``i`` of task ``t`` with seed ``s`` is drawn from its own
``random.Random(f"perk_fast/{t}/{s}/{i}")`` (string seeds hash with SHA-512, so results do not
depend on ``PYTHONHASHSEED`` or on ``n``): ``generate(t, 5, seed=s)[:3] == generate(t, 3, seed=s)``.

Vocabulary is deliberately small (a few dozen words) so that a tiny byte-level model can learn it;
filler text never mentions the people, places, objects or verbs of the facts.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

__all__ = [
    "Example", "TASKS", "POSITIONS", "byte_length", "render_record", "generate",
    "needle", "qa1", "qa2", "qa3", "records_recall", "records_relation", "records_aggregate",
]

TASKS = ("needle", "qa1", "qa2", "qa3", "records_recall", "records_relation", "records_aggregate")
POSITIONS = ("pre", "mid", "post", "random")

CountTokens = Callable[[str], int]


@dataclass
class Example:
    """One PERK problem: documents to memorise, a question and its answer.

    ``support``: the context sentences the answer follows from (None when not given).
    ``meta``: provenance -- task, seed, index, position, depth, context_tokens, kind, ...
    """

    context: list[str]
    question: str
    answer: str
    support: list[str] | None = None
    meta: dict = field(default_factory=dict)


def byte_length(text: str) -> int:
    """Number of UTF-8 bytes of ``text``: the token count of a byte-level tokenizer."""
    return len(text.encode("utf-8"))


# ----------------------------------------------------------------------------- vocabulary
PEOPLE = ("Mary", "John", "Sandra", "Daniel", "Emma", "Fred", "Julie", "Bill", "Lucy", "Tom")
PLACES = ("kitchen", "garden", "office", "bathroom", "bedroom", "hallway")
OBJECTS = ("apple", "milk", "football", "key", "cup", "box")

_MOVE = ("{p} went to the {x}.", "{p} moved to the {x}.", "{p} travelled to the {x}.",
         "{p} journeyed to the {x}.")
_GRAB = ("{p} picked up the {x}.", "{p} got the {x}.", "{p} grabbed the {x}.")
_DROP = ("{p} dropped the {x}.", "{p} put down the {x}.", "{p} left the {x}.")

_ADJ = ("old", "small", "quiet", "grey", "tall", "red", "bright", "cold", "green", "soft")
_NOUN = {"river": "rivers", "bird": "birds", "cloud": "clouds", "lake": "lakes", "tree": "trees",
         "boat": "boats", "star": "stars", "leaf": "leaves", "hill": "hills", "stone": "stones"}
_VERB = {"sings": "sing", "drifts": "drift", "shines": "shine", "waits": "wait", "rests": "rest",
         "glows": "glow", "sways": "sway", "hums": "hum"}
_ADV = ("slowly", "softly", "all day", "at night", "in the rain", "by the hill", "under the moon",
        "for a while")
_TIME = ("day", "night", "morning", "evening")
_SHORT = ("All was calm.", "Time passed.", "Rain fell.", "Birds sang.", "It was still.")

NEEDLE = "The secret code of {name} is {value}."
NEEDLE_QUESTION = "What is the secret code of {name}?"

FIRST_NAMES = ("Alice", "Ben", "Clara", "David", "Eva", "Frank", "Grace", "Henry", "Iris", "Jack",
               "Lena", "Omar")
LAST_NAMES = ("Stone", "Rivera", "Chen", "Novak", "Brooks", "Meyer", "Okafor", "Silva", "Hale",
              "Park")
YEARS = ("Freshman", "Sophomore", "Junior", "Senior")
SCHOOLS = {
    "School of Engineering": ("Civil Engineering", "Mechanical Engineering", "Electrical Engineering"),
    "School of Science": ("Physics", "Chemistry", "Biology"),
    "School of Arts and Humanities": ("History", "Philosophy", "Music"),
    "School of Business": ("Finance", "Marketing", "Accounting"),
}
RECORD_KEYS = ("Student Id", "Student Name", "Year", "School", "Major", "Grade")

_RECALL = {
    "name": ("What is the name of student {a}?", "Student Name"),
    "year": ("Which year is student {a} in?", "Year"),
    "school": ("Which school is student {a} enrolled in?", "School"),
    "major": ("What is the major of student {a}?", "Major"),
    "grade": ("What is the grade of student {a}?", "Grade"),
}
_RELATION = {
    "school": "Are student {a} and student {b} in the same school?",
    "year": "Are student {a} and student {b} in the same year?",
    "major": "Do student {a} and student {b} study the same major?",
    "grade": "Does student {a} have a higher grade than student {b}?",
}
_AGGREGATE = {
    "count_school": "How many students are enrolled in the {school}?",
    "count_major": "How many students study {major}?",
    "count_grade_above": "How many students in the {school} have a grade above {threshold}?",
    "max_grade": "What is the highest grade in the {school}?",
    "min_grade": "What is the lowest grade in the {school}?",
}
_THRESHOLDS = (40, 50, 60, 70)


def render_record(record: dict) -> str:
    """Render one student record (reference keys, see ``RECORD_KEYS``) as the reference's line:
    ``Student <id>, Name: ..., Year: ..., School: ..., Major: ..., Grade: ...`` (the id keeps its
    angle brackets, as in eric11eca/perk)."""
    return (f"Student <{record['Student Id']}>, Name: {record['Student Name']}, "
            f"Year: {record['Year']}, School: {record['School']}, Major: {record['Major']}, "
            f"Grade: {record['Grade']}")


# ----------------------------------------------------------------------------- validation
def _invalid(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid; allowed: {allowed}")


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (
            high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise _invalid(name, value, allowed)


def _check_common(n, seed, context_tokens, position, doc_tokens, count_tokens) -> None:
    _check_int("n", n, 0)
    if not isinstance(seed, (int, str)) or isinstance(seed, bool):
        raise _invalid("seed", seed, "an int or a str")
    _check_int("context_tokens", context_tokens, 1)
    if position not in POSITIONS:
        raise _invalid("position", position, f"one of {POSITIONS}")
    _check_int("doc_tokens", doc_tokens, 1)
    if not callable(count_tokens):
        raise _invalid("count_tokens", count_tokens, "a callable str -> int")


def _check_choice(name: str, values, allowed: Sequence[str]) -> tuple[str, ...]:
    values = tuple(allowed) if values is None else tuple(values)
    if not values or any(v not in allowed for v in values):
        raise _invalid(name, values, f"a non-empty subset of {tuple(allowed)}")
    return values


_PLACE_TRIES = 64


def _rng(task: str, seed, index: int) -> random.Random:
    return random.Random(f"perk_fast/{task}/{seed}/{index}")


# ----------------------------------------------------------------------------- assembly
def _fill(rng: random.Random, budget: int, make_unit: Callable[[random.Random], str],
          cost: Callable[[str], int]) -> list[str]:
    """Draw units until ``budget`` tokens are used; the last unit is kept when it brings the
    total closer to the budget. A few short draws are tried before giving up on a tail."""
    units, used, misses = [], 0, 0
    while used < budget:
        unit = make_unit(rng)
        c = cost(unit)
        if used + c <= budget:
            units.append(unit)
            used += c
            misses = 0
            continue
        misses += 1
        if misses >= 8:
            if used + c - budget < budget - used:  # overshoot smaller than undershoot
                units.append(unit)
            break
    return units


def _place(rng: random.Random, filler: list[str], facts: list[str], position: str,
           cost: Callable[[str], int], context_tokens: int, what: str) -> tuple[list[str], list[int]]:
    """Insert ``facts`` (in order) between filler units so that every fact lies in the third of
    the token span that ``position`` names. Returns the units and the facts' indices in them.

    Facts inserted at filler boundaries i_1 <= ... <= i_k start at >= cum[i_1] and end at
    <= cum[i_k] + size, so boundaries with lo <= cum[i] <= hi - size keep the whole block inside
    [lo, hi]. When a tight third has no such boundary, the filler (exchangeable draws) is
    reshuffled a bounded number of times before giving up.
    """
    size = sum(cost(f) for f in facts)
    total = sum(cost(u) for u in filler) + size
    filler = list(filler)
    for _ in range(_PLACE_TRIES):
        cum = [0]
        for u in filler:
            cum.append(cum[-1] + cost(u))
        if position == "random":
            candidates = list(range(len(filler) + 1))
        else:
            third = POSITIONS.index(position)
            lo, hi = total * third / 3, total * (third + 1) / 3
            candidates = [i for i in range(len(filler) + 1) if lo <= cum[i] and cum[i] + size <= hi]
        if candidates:
            break
        rng.shuffle(filler)
    else:
        raise _invalid("context_tokens", context_tokens,
                       f"a larger value: {what} ({size} tokens) do not fit in the "
                       f"{position!r} third of a {total}-token context")
    slots = sorted(rng.choice(candidates) for _ in facts)
    units, fact_idx = [], []
    k = 0
    for i in range(len(filler) + 1):
        while k < len(facts) and slots[k] == i:
            fact_idx.append(len(units))
            units.append(facts[k])
            k += 1
        if i < len(filler):
            units.append(filler[i])
    return units, fact_idx


def _pack(units: list[str], doc_tokens: int, cost: Callable[[str], int],
          count_tokens: CountTokens, sep: str) -> list[str]:
    """Greedily join units (with ``sep``) into documents of at most ``doc_tokens`` tokens."""
    docs, cur, cur_cost = [], [], 0
    for unit in units:
        if cur and cur_cost + count_tokens(unit) > doc_tokens:
            docs.append(sep.join(cur))
            cur, cur_cost = [], 0
        cur.append(unit)
        cur_cost += cost(unit)
    if cur:
        docs.append(sep.join(cur))
    return docs


def _build(task: str, seed, index: int, rng: random.Random, *, filler: list[str],
           facts: list[str], relevant: list[int], question: str, answer: str, with_support: bool,
           position: str, context_tokens: int, doc_tokens: int, count_tokens: CountTokens,
           sep: str, what: str, meta: dict | None = None) -> Example:
    """Place facts in the filler, pack documents and record provenance.

    ``relevant`` indexes the facts that form ``support`` (others, e.g. distractor story events,
    are placed but not cited)."""
    cost = lambda u: count_tokens(u + sep)  # noqa: E731 -- a unit and its separator
    units, fact_idx = _place(rng, filler, facts, position, cost, context_tokens, what)
    before = sum(cost(u) for u in units[:fact_idx[0]]) if fact_idx else 0
    total = sum(cost(u) for u in units)
    docs = _pack(units, doc_tokens, cost, count_tokens, sep)
    info = {"task": task, "seed": seed, "index": index, "position": position,
            "depth": round(before / total, 4) if total else 0.0,
            "context_tokens": sum(count_tokens(d) for d in docs),
            "facts_tokens": sum(cost(f) for f in facts)}
    info.update(meta or {})
    support = [facts[i] for i in relevant] if with_support else None
    return Example(context=docs, question=question, answer=answer, support=support, meta=info)


def _filler_sentence(rng: random.Random) -> str:
    """One sentence of the filler grammar (no people, places, objects or movement verbs)."""
    form = rng.randrange(10)
    if form < 5:
        noun, verb = rng.choice(tuple(_NOUN)), rng.choice(tuple(_VERB))
        det = rng.choice(("The", "One"))
        return f"{det} {rng.choice(_ADJ)} {noun} {verb} {rng.choice(_ADV)}."
    if form < 8:
        nouns, verb = rng.choice(tuple(_NOUN.values())), rng.choice(tuple(_VERB.values()))
        return f"Some {rng.choice(_ADJ)} {nouns} {verb} {rng.choice(_ADV)}."
    if form < 9:
        return f"It was a {rng.choice(_ADJ)} {rng.choice(_TIME)}."
    return rng.choice(_SHORT)


# ----------------------------------------------------------------------------- needle
def needle(n: int, *, seed=0, context_tokens: int = 1024, position: str = "random",
           doc_tokens: int = 256, count_tokens: CountTokens = byte_length,
           n_distractors: int = 0, value_digits: int = 4,
           with_support: bool = False) -> list[Example]:
    """Needle in a haystack: "The secret code of <name> is <value>." hidden in filler text.

    Args:
        n_distractors: further needles with other names and values, placed anywhere.
        value_digits: number of digits of the value (the answer).
        with_support: set ``support`` to ``[needle sentence]``.
    """
    _check_common(n, seed, context_tokens, position, doc_tokens, count_tokens)
    _check_int("n_distractors", n_distractors, 0, len(PEOPLE) - 1)
    _check_int("value_digits", value_digits, 1, 12)
    out = []
    for i in range(n):
        rng = _rng("needle", seed, i)
        names = rng.sample(PEOPLE, 1 + n_distractors)
        values: list[str] = []
        while len(values) < len(names):
            v = str(rng.randrange(10 ** (value_digits - 1), 10 ** value_digits))
            if v not in values:
                values.append(v)
        fact = NEEDLE.format(name=names[0], value=values[0])
        others = [NEEDLE.format(name=a, value=v) for a, v in zip(names[1:], values[1:])]
        cost = lambda u: count_tokens(u + " ")  # noqa: E731
        budget = context_tokens - cost(fact) - sum(cost(o) for o in others)
        filler = _fill(rng, budget, _filler_sentence, cost)
        for other in others:
            filler.insert(rng.randint(0, len(filler)), other)
        out.append(_build(
            "needle", seed, i, rng, filler=filler, facts=[fact], relevant=[0],
            question=NEEDLE_QUESTION.format(name=names[0]), answer=values[0],
            with_support=with_support, position=position, context_tokens=context_tokens,
            doc_tokens=doc_tokens, count_tokens=count_tokens, sep=" ", what="the needle"))
    return out


# ----------------------------------------------------------------------------- BabiLong-like
def _moves(rng: random.Random, person: str, start: str | None, k: int,
           avoid: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """``k`` move sentences for ``person``, each to a new place not in ``avoid``."""
    sentences, places, here = [], [], start
    for _ in range(k):
        place = rng.choice([p for p in PLACES if p != here and p not in avoid])
        sentences.append(rng.choice(_MOVE).format(p=person, x=place))
        places.append(place)
        here = place
    return sentences, places


def _bystander(rng: random.Random, person: str, objects: list[str], k: int) -> list[str]:
    """``k`` events of a person outside the question: moves, and picking up / dropping objects
    that only this person ever touches (so chains of different people commute)."""
    events, here, held, free = [], None, [], list(objects)
    for j in range(k):
        roll = rng.random()
        if j > 0 and free and roll < 0.25:
            obj = free.pop(rng.randrange(len(free)))
            events.append(rng.choice(_GRAB).format(p=person, x=obj))
            held.append(obj)
        elif held and roll < 0.45:
            obj = held.pop(rng.randrange(len(held)))
            events.append(rng.choice(_DROP).format(p=person, x=obj))
        else:
            (sentence,), (here,) = _moves(rng, person, here, 1)
            events.append(sentence)
    return events


def _interleave(rng: random.Random, chains: list[list[str]]) -> list[tuple[int, int]]:
    """A random merge of the chains keeping each chain's order: (chain, position) pairs."""
    left = [len(c) for c in chains]
    taken = [0] * len(chains)
    order = []
    while any(left):
        c = rng.choices(range(len(chains)), weights=left)[0]
        order.append((c, taken[c]))
        taken[c] += 1
        left[c] -= 1
    return order


def _story(rng: random.Random, hops: int, n_people: int,
           n_distractors: int) -> tuple[list[str], list[int], str, str]:
    """A time-ordered story; returns (facts, indices of the support facts, question, answer).

    hops=1: X moves 1-3 times; "Where is X?" -> last place (support: the last move).
    hops=2: X moves, picks up O, moves 1-2 more times; "Where is the O?" -> X's last place
            (support: the pick-up and X's last move).
    hops=3: X moves (last to A), picks up O, moves to P, then maybe on (never back to P) and
            maybe drops O; "Where was the O before the P?" -> A (support: move to A, pick-up,
            move to P).
    """
    people = rng.sample(PEOPLE, n_people)
    target, others = people[0], people[1:]
    obj = rng.choice(OBJECTS)
    spare = [o for o in OBJECTS if o != obj] if hops > 1 else []
    if hops == 1:
        chain, places = _moves(rng, target, None, rng.randint(1, 3))
        support, question, answer = [len(chain) - 1], f"Where is {target}?", places[-1]
    elif hops == 2:
        pre, pre_places = _moves(rng, target, None, rng.randint(1, 2))
        grab = rng.choice(_GRAB).format(p=target, x=obj)
        post, post_places = _moves(rng, target, pre_places[-1], rng.randint(1, 2))
        chain = pre + [grab] + post
        support = [len(pre), len(chain) - 1]
        question, answer = f"Where is the {obj}?", post_places[-1]
    else:
        pre, pre_places = _moves(rng, target, None, rng.randint(1, 2))
        origin = pre_places[-1]
        grab = rng.choice(_GRAB).format(p=target, x=obj)
        (to_dest,), (dest,) = _moves(rng, target, origin, 1)
        post, _ = _moves(rng, target, dest, rng.randint(0, 2), avoid=(dest,))
        chain = pre + [grab, to_dest] + post
        if rng.random() < 0.5:
            chain.append(rng.choice(_DROP).format(p=target, x=obj))
        support = [len(pre) - 1, len(pre), len(pre) + 1]
        question, answer = f"Where was the {obj} before the {dest}?", origin
    # Distractor events go to the other people; each of them owns a disjoint set of objects.
    counts = [0] * len(others)
    for _ in range(n_distractors):
        counts[rng.randrange(len(others))] += 1
    owned = [spare[j::len(others)] for j in range(len(others))]
    chains = [chain] + [_bystander(rng, p, o, k) for p, o, k in zip(others, owned, counts)]
    facts, relevant = [], []
    for c, pos in _interleave(rng, chains):
        if c == 0 and pos in support:
            relevant.append(len(facts))
        facts.append(chains[c][pos])
    return facts, relevant, question, answer


def _babi(task: str, hops: int, n: int, *, seed, context_tokens, position, doc_tokens,
          count_tokens, n_people, n_distractors, with_support) -> list[Example]:
    _check_common(n, seed, context_tokens, position, doc_tokens, count_tokens)
    _check_int("n_people", n_people, 2, len(PEOPLE))
    _check_int("n_distractors", n_distractors, 0)
    out = []
    for i in range(n):
        rng = _rng(task, seed, i)
        facts, relevant, question, answer = _story(rng, hops, n_people, n_distractors)
        cost = lambda u: count_tokens(u + " ")  # noqa: E731
        filler = _fill(rng, context_tokens - sum(cost(f) for f in facts), _filler_sentence, cost)
        out.append(_build(
            task, seed, i, rng, filler=filler, facts=facts, relevant=relevant,
            question=question, answer=answer, with_support=with_support, position=position,
            context_tokens=context_tokens, doc_tokens=doc_tokens, count_tokens=count_tokens,
            sep=" ", what=f"the {len(facts)} story facts", meta={"n_facts": len(facts)}))
    return out


def qa1(n: int, *, seed=0, context_tokens: int = 1024, position: str = "random",
        doc_tokens: int = 256, count_tokens: CountTokens = byte_length, n_people: int = 3,
        n_distractors: int = 4, with_support: bool = True) -> list[Example]:
    """BabiLong-like qa1 (single supporting fact): "Where is <person>?".

    Args:
        n_people: people in the story (the asked-about one and bystanders), >= 2.
        n_distractors: story events of the bystanders (moves, object handling).
        with_support: set ``support`` to the answer's supporting facts.
    The story (all its facts) lies in the ``position`` third, in time order.
    """
    return _babi("qa1", 1, n, seed=seed, context_tokens=context_tokens, position=position,
                 doc_tokens=doc_tokens, count_tokens=count_tokens, n_people=n_people,
                 n_distractors=n_distractors, with_support=with_support)


def qa2(n: int, *, seed=0, context_tokens: int = 1024, position: str = "random",
        doc_tokens: int = 256, count_tokens: CountTokens = byte_length, n_people: int = 3,
        n_distractors: int = 4, with_support: bool = True) -> list[Example]:
    """BabiLong-like qa2 (two supporting facts): "Where is the <object>?" -- a person picked it
    up, then moved. Parameters as in ``qa1``."""
    return _babi("qa2", 2, n, seed=seed, context_tokens=context_tokens, position=position,
                 doc_tokens=doc_tokens, count_tokens=count_tokens, n_people=n_people,
                 n_distractors=n_distractors, with_support=with_support)


def qa3(n: int, *, seed=0, context_tokens: int = 1024, position: str = "random",
        doc_tokens: int = 256, count_tokens: CountTokens = byte_length, n_people: int = 3,
        n_distractors: int = 4, with_support: bool = True) -> list[Example]:
    """BabiLong-like qa3 (three supporting facts): "Where was the <object> before the <place>?".
    Parameters as in ``qa1``."""
    return _babi("qa3", 3, n, seed=seed, context_tokens=context_tokens, position=position,
                 doc_tokens=doc_tokens, count_tokens=count_tokens, n_people=n_people,
                 n_distractors=n_distractors, with_support=with_support)


# ----------------------------------------------------------------------------- student records
def _random_record(rng: random.Random, ids: set, id_digits: int, **fixed) -> dict:
    """A random student record with a fresh id (added to ``ids``); ``fixed`` overrides fields
    by short name (school, major, year, grade)."""
    while True:
        sid = str(rng.randrange(10 ** (id_digits - 1), 10 ** id_digits))
        if sid not in ids:
            ids.add(sid)
            break
    school = fixed.get("school") or rng.choice(tuple(SCHOOLS))
    major = fixed.get("major") or rng.choice(SCHOOLS[school])
    if major not in SCHOOLS[school]:
        school = next(s for s, majors in SCHOOLS.items() if major in majors)
    grade = fixed.get("grade")
    return {
        "Student Id": sid,
        "Student Name": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
        "Year": fixed.get("year") or rng.choice(YEARS),
        "School": school,
        "Major": major,
        "Grade": str(rng.randint(0, 100) if grade is None else grade),
    }


def _records_common(n, seed, context_tokens, position, doc_tokens, count_tokens, id_digits):
    _check_common(n, seed, context_tokens, position, doc_tokens, count_tokens)
    _check_int("id_digits", id_digits, 3, 12)


def _records_example(task, seed, i, rng, *, relevant_records, filler_record, question, answer,
                     kind, with_support, position, context_tokens, doc_tokens, count_tokens):
    facts = [render_record(r) for r in relevant_records]
    rng.shuffle(facts)
    cost = lambda u: count_tokens(u + "\n")  # noqa: E731
    filler = _fill(rng, context_tokens - sum(cost(f) for f in facts),
                   lambda r: render_record(filler_record(r)), cost)
    ex = _build(task, seed, i, rng, filler=filler, facts=facts, relevant=list(range(len(facts))),
                question=question, answer=answer, with_support=with_support,
                position=position, context_tokens=context_tokens, doc_tokens=doc_tokens,
                count_tokens=count_tokens, sep="\n", what="the asked-about records",
                meta={"kind": kind})
    ex.meta["n_records"] = len(facts) + len(filler)
    return ex


_LONGEST_RECORD = {
    "Student Id": "9" * 12,
    "Student Name": max((f"{a} {b}" for a in FIRST_NAMES for b in LAST_NAMES), key=len),
    "Year": max(YEARS, key=len), "School": max(SCHOOLS, key=len),
    "Major": max((m for ms in SCHOOLS.values() for m in ms), key=len), "Grade": "100",
}


def _group_room(context_tokens: int, position: str, count_tokens: CountTokens) -> float:
    """Tokens the asked-about group may take: for pre/mid/post, a third of the context less
    1.5 record lines -- the placement grain is one filler record, and the realised context may
    differ from the target by half a record."""
    if position == "random":
        return context_tokens / 2
    return context_tokens / 3 - 1.5 * count_tokens(render_record(_LONGEST_RECORD) + "\n")


def records_recall(n: int, *, seed=0, context_tokens: int = 1024, position: str = "random",
                   doc_tokens: int = 512, count_tokens: CountTokens = byte_length,
                   fields: Sequence[str] | None = None, id_digits: int = 4,
                   with_support: bool = False) -> list[Example]:
    """Student records, recall: "What is the major of student <id>?" and the like.

    Args:
        fields: question kinds to draw from, subset of name/year/school/major/grade (default all).
        id_digits: digits of student ids (unique within a context).
        with_support: set ``support`` to the asked-about record line.
    """
    _records_common(n, seed, context_tokens, position, doc_tokens, count_tokens, id_digits)
    fields = _check_choice("fields", fields, tuple(_RECALL))
    out = []
    for i in range(n):
        rng = _rng("records_recall", seed, i)
        ids: set = set()
        kind = rng.choice(fields)
        rec = _random_record(rng, ids, id_digits)
        template, key = _RECALL[kind]
        out.append(_records_example(
            "records_recall", seed, i, rng, relevant_records=[rec],
            filler_record=lambda r: _random_record(r, ids, id_digits),
            question=template.format(a=rec["Student Id"]), answer=rec[key], kind=kind,
            with_support=with_support, position=position, context_tokens=context_tokens,
            doc_tokens=doc_tokens, count_tokens=count_tokens))
    return out


def _relation_pair(rng: random.Random, kind: str, want: bool, ids: set,
                   id_digits: int) -> tuple[dict, dict]:
    """Two records whose relation ``kind`` holds iff ``want``."""
    a = _random_record(rng, ids, id_digits)
    if kind == "school":
        school = a["School"] if want else rng.choice([s for s in SCHOOLS if s != a["School"]])
        b = _random_record(rng, ids, id_digits, school=school)
    elif kind == "year":
        year = a["Year"] if want else rng.choice([y for y in YEARS if y != a["Year"]])
        b = _random_record(rng, ids, id_digits, year=year)
    elif kind == "major":
        majors = [m for ms in SCHOOLS.values() for m in ms if m != a["Major"]]
        b = _random_record(rng, ids, id_digits, major=a["Major"] if want else rng.choice(majors))
    else:  # grade: "does a have a higher grade than b?"
        hi, lo = sorted(rng.sample(range(101), 2), reverse=True)
        a["Grade"] = str(hi if want else lo)
        b = _random_record(rng, ids, id_digits, grade=lo if want else hi)
    return a, b


def records_relation(n: int, *, seed=0, context_tokens: int = 1024, position: str = "random",
                     doc_tokens: int = 512, count_tokens: CountTokens = byte_length,
                     relations: Sequence[str] | None = None, id_digits: int = 4,
                     with_support: bool = False) -> list[Example]:
    """Student records, relation (Yes/No, balanced): same school / year / major, higher grade.

    Args:
        relations: kinds to draw from, subset of school/year/major/grade (default all).
        id_digits, with_support: as in ``records_recall`` (support: both records).
    Both records lie in the ``position`` third.
    """
    _records_common(n, seed, context_tokens, position, doc_tokens, count_tokens, id_digits)
    relations = _check_choice("relations", relations, tuple(_RELATION))
    out = []
    for i in range(n):
        rng = _rng("records_relation", seed, i)
        ids: set = set()
        kind = rng.choice(relations)
        want = rng.random() < 0.5
        a, b = _relation_pair(rng, kind, want, ids, id_digits)
        out.append(_records_example(
            "records_relation", seed, i, rng, relevant_records=[a, b],
            filler_record=lambda r: _random_record(r, ids, id_digits),
            question=_RELATION[kind].format(a=a["Student Id"], b=b["Student Id"]),
            answer="Yes" if want else "No", kind=kind, with_support=with_support,
            position=position, context_tokens=context_tokens, doc_tokens=doc_tokens,
            count_tokens=count_tokens))
    return out


def records_aggregate(n: int, *, seed=0, context_tokens: int = 1024, position: str = "random",
                      doc_tokens: int = 512, count_tokens: CountTokens = byte_length,
                      kinds: Sequence[str] | None = None, max_group: int = 4,
                      id_digits: int = 4, with_support: bool = False) -> list[Example]:
    """Student records, aggregation over a group (the students of a school or of a major):
    count_school, count_major, count_grade_above (in a school), max_grade / min_grade (in a
    school). Answers are integers as strings.

    Args:
        kinds: question kinds to draw from (default all).
        max_group: most students in the group (at least 1; fewer when the ``position`` third
            cannot hold more records).
        id_digits, with_support: as in ``records_recall`` (support: the group's records).
    All of the group's records lie in the ``position`` third; no other record belongs to it.
    """
    _records_common(n, seed, context_tokens, position, doc_tokens, count_tokens, id_digits)
    kinds = _check_choice("kinds", kinds, tuple(_AGGREGATE))
    _check_int("max_group", max_group, 1)
    out = []
    for i in range(n):
        rng = _rng("records_aggregate", seed, i)
        ids: set = set()
        kind = rng.choice(kinds)
        school = rng.choice(tuple(SCHOOLS))
        major = rng.choice(SCHOOLS[school])
        by_major = kind == "count_major"
        threshold = rng.choice(_THRESHOLDS)
        room = _group_room(context_tokens, position, count_tokens)
        group: list[dict] = []
        size = rng.randint(1, max_group)
        while len(group) < size:
            rec = _random_record(rng, ids, id_digits, **({"major": major} if by_major else {"school": school}))
            if kind == "count_grade_above":
                while int(rec["Grade"]) == threshold:  # keep "above" unambiguous
                    rec["Grade"] = str(rng.randint(0, 100))
            if group and sum(count_tokens(render_record(r) + "\n") for r in group + [rec]) > room:
                ids.discard(rec["Student Id"])
                break
            group.append(rec)
        grades = [int(r["Grade"]) for r in group]
        answer = {
            "count_school": len(group), "count_major": len(group),
            "count_grade_above": sum(g > threshold for g in grades),
            "max_grade": max(grades), "min_grade": min(grades),
        }[kind]

        def outsider(r: random.Random) -> dict:
            if by_major:
                others = [m for ms in SCHOOLS.values() for m in ms if m != major]
                return _random_record(r, ids, id_digits, major=r.choice(others))
            others = [s for s in SCHOOLS if s != school]
            return _random_record(r, ids, id_digits, school=r.choice(others))

        out.append(_records_example(
            "records_aggregate", seed, i, rng, relevant_records=group, filler_record=outsider,
            question=_AGGREGATE[kind].format(school=school, major=major, threshold=threshold),
            answer=str(answer), kind=kind, with_support=with_support, position=position,
            context_tokens=context_tokens, doc_tokens=doc_tokens, count_tokens=count_tokens))
    return out


# ----------------------------------------------------------------------------- dispatch
_GENERATORS = {
    "needle": needle, "qa1": qa1, "qa2": qa2, "qa3": qa3, "records_recall": records_recall,
    "records_relation": records_relation, "records_aggregate": records_aggregate,
}


def generate(task: str, n: int, *, seed=0, context_tokens: int = 1024,
             position: str = "random", **kw) -> list[Example]:
    """Generate ``n`` examples of ``task`` (one of ``TASKS``); ``kw`` goes to the task's
    generator (``doc_tokens``, ``count_tokens``, ``with_support`` and task-specific options)."""
    if task not in _GENERATORS:
        raise _invalid("task", task, f"one of {TASKS}")
    return _GENERATORS[task](n, seed=seed, context_tokens=context_tokens, position=position, **kw)
