"""Train the convolution-attention (hourglass) model: python train_conv_attention.py --preset tiny"""
from base_trainer import main

if __name__ == "__main__":
    main("conv_attention")
