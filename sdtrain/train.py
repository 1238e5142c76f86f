"""`python -m sdtrain.train` (and `torchrun -m sdtrain.train`): the same as `sdtrain-train`, whose
entry point is `sdtrain/cli/train.py`."""

from sdtrain.cli.train import main

if __name__ == "__main__":
    main()
