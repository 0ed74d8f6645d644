"""The shipped model (curriculum15) continued 1,500 meta-steps of its own recipe with the inner loss
weighting later segments more (perk segment_recency=0.5) -> bench/results/demo_curriculum20."""
import dataclasses, os, sys
sys.path.insert(0, os.getcwd())
from perk_fast import demo_train as dt

def logger(path):
    fh = open(path, "a", encoding="utf-8")
    def log(*a, **k):
        msg = " ".join(str(x) for x in a)
        print(msg, flush=True); fh.write(msg + "\n"); fh.flush()
    return log

def main():
    rec = dataclasses.replace(dt._MIX_ORDERED, perk=dict(dt._MIX_ORDERED.perk, segment_recency=0.5), meta_steps=1500,
                              icr_long_steps=3000, init_from="bench/results/demo_curriculum15/assets")
    base = "bench/results/demo_curriculum20"
    os.makedirs(base, exist_ok=True)
    ck = os.path.join(base, "ckpt")
    resume = os.path.exists(os.path.join(ck, "last", "trainer_state.json"))
    dt.train(rec, os.path.join(base, "assets"), log=logger(os.path.join(base, "train.log")),
             eval_dir=os.path.join(base, "eval"), checkpoint_dir=ck, resume=resume)

if __name__ == "__main__":
    main()
