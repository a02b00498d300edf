"""Evaluate a checkpoint: ``python eval.py checkpoint=PATH eval.episodes=50 eval.out=results.json``."""

from rtpolicy.cli import eval_main

if __name__ == "__main__":
    eval_main()
