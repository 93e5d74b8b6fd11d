"""Train WGAN-div.

    accelerate launch trainer/run.py --config configs/ffhq64.yaml [dotted.key=value ...] [--resume auto|PATH]
    python trainer/run.py --config configs/demo.yaml            # one process

Overrides are parsed by the schema's types: train.batch_size=8 loss.r=fake train.betas=[0.0,0.9].
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.errors import (
    USER_ERROR_EXIT_CODE,
    ArgumentParser,
    PeerFailure,
    UserError,
    plain_warnings,
    process_rank,
    processes_connected,
    report_user_error,
    stop_when_the_launcher_dies,
)

USAGE = "trainer/run.py --config PATH [dotted.key=value ...] [--resume auto|PATH]"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, usage_line=USAGE)
    parser.add_argument("--config", required=True, help="YAML config file (see configs/).")
    parser.add_argument(
        "--resume",
        default=None,
        metavar="auto|PATH",
        help="auto: continue from the newest complete checkpoint in run.dir (a fresh start if "
        "there is none); PATH: from that checkpoint directory.",
    )
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="Config overrides.")
    # Overrides may come before or after the options: `--resume auto train.iterations=300000` extends a run.
    return parser.parse_intermixed_args(argv)


def leave_the_process_group() -> None:
    """All ranks leave together: left to the interpreter's exit, gloo's threads could abort a rank whose peer had
    already gone ("terminate called without an active exception", status -6, seen under load in CI)."""
    if processes_connected():
        import torch.distributed as distributed

        distributed.barrier()
        distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    plain_warnings()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        stop_when_the_launcher_dies()
        from trainer.config import load_config

        cfg = load_config(args.config, args.overrides)
        if os.environ.get("WANDB_SWEEP_ID") and os.environ.get("WANDB_RUN_ID"):
            # Started by `wandb agent`: every run of the sweep gets its own directory (and resumes from it).
            cfg.run.dir = str(Path(cfg.run.dir) / os.environ["WANDB_RUN_ID"])
        from trainer.loop import train

        train(cfg, resume=args.resume)
        leave_the_process_group()
        return 0
    except UserError as error:
        report_user_error(error)
        if processes_connected():
            # Leave without the process group's destructors, as below: with a peer already gone, gloo's threads
            # could abort this process at interpreter exit ("terminate called without an active exception").
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(USER_ERROR_EXIT_CODE)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        from trainer.distributed import is_peer_failure

        rank = process_rank()
        if is_peer_failure(error):
            detail = error if isinstance(error, PeerFailure) else type(error).__name__
            print(
                f"[rank {rank}] stopping: another process failed ({detail}); its error is reported above or in "
                f"its own log.",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(f"[rank {rank}] training failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        # Exit now, without waiting in collectives or destructors for processes that may be gone.
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
