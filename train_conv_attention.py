"""Train the convolution-attention (hourglass) model: python train_conv_attention.py --preset tiny"""
from plumbing import ctrl_c  # noqa: F401  (first: Ctrl-C during the imports below is one line, exit 130)
from base_trainer import main

if __name__ == "__main__":
    main("conv_attention")
