"""Train and evaluate a model: ``python main.py [--key=value ...]``.

Reads config.yaml, then datasets/<dataset>.yaml, then the overrides, e.g.
``python main.py --dataset=ml-1m --epochs=50``. ``--checkpoint=PATH`` resumes an
unfinished run from its last.pth or evaluates a finished one. ``--nproc=N`` trains
on N processes (GPUs), as does ``torchrun --nproc_per_node=N main.py ...``.
"""

import os
import sys

from ssd4rec.errors import SSD4RecError


def main(argv):
    from ssd4rec.run import run

    try:
        result = run(argv)
    except SSD4RecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun every rank has the metrics; rank 0 prints them
    print(f"best valid: {result['best_valid_result']}")
    print(f"test:       {result['test_result']}")
    print(f"checkpoint: {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
