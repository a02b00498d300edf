"""Train a policy: ``python train.py`` runs the default job (see rtpolicy/conf/train.yaml)."""

from rtpolicy.cli import train_main

if __name__ == "__main__":
    train_main()
