"""Train the baseline GPT-2. `python train_baseline_gpt2.py --help` lists every option."""
from plumbing import ctrl_c  # noqa: F401  (first: Ctrl-C during the imports below is one line, exit 130)
from base_trainer import main

if __name__ == "__main__":
    main("baseline_gpt2")
