"""Train the dual-mask GPT (forward + backward prediction): python train_dual_mask_gpt.py --preset tiny --p-bw 0.05"""
from plumbing import ctrl_c  # noqa: F401  (first: Ctrl-C during the imports below is one line, exit 130)
from base_trainer import main

if __name__ == "__main__":
    main("dual_mask_gpt")
