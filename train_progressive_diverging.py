"""Train the progressive diverging model (3 -> 6 -> 12 blocks, LoRA on attention from stage 2):
python train_progressive_diverging.py --preset tiny. `--help` lists every option (--stage2-at, --lora-rank, ...)."""
from plumbing import ctrl_c  # noqa: F401  (first: Ctrl-C during the imports below is one line, exit 130)
from base_trainer import main

if __name__ == "__main__":
    main("progressive_diverging")
