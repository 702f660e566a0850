import torch
from torch import nn

from tdcdiff.flops import count_flops
from tdcdiff.models import build_unet


class ConvStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.linear = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x, t):
        return self.linear(self.conv(x).flatten(1))


def test_conv_linear_stack_matches_hand_count():
    # conv: every output element does 3*3*3 MACs; linear: 128*10 MACs. FLOPs = 2 x MACs.
    conv_macs = 8 * 4 * 4 * (3 * 3 * 3)
    linear_macs = 128 * 10
    assert count_flops(ConvStack(), (3, 4, 4)) == 2 * (conv_macs + linear_macs)


def test_attention_is_counted():
    plain = count_flops(build_unet("digits-8"), (1, 8, 8))
    with_attention = count_flops(build_unet("digits-8", attention=True), (1, 8, 8))
    # the attention blocks' linears alone would add little; the SDPA matmuls must be counted too
    q = 64 * 16  # 64 channels x 16 positions at the 4x4 level
    assert with_attention > plain + 2 * 16 * q  # more than the QK^T matmul at one block alone


def test_flops_do_not_depend_on_timestep():
    model = build_unet("digits-8")
    assert count_flops(model, (1, 8, 8), timestep=0) == count_flops(model, (1, 8, 8), timestep=999)
