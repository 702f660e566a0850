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


def test_attention_matmuls_are_counted():
    from torch.utils.flop_counter import FlopCounterMode

    model = build_unet("digits-8", attention=True)
    without_mapping = FlopCounterMode(display=False)
    with without_mapping:
        model(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))
    # 4 attention layers (down, mid, 2 up) at the 4x4 level: 16 tokens, 64 channels as 8 heads of 8.
    # QK^T and AV: 2 matmuls x 2 FLOPs/MAC x heads x tokens^2 x head_dim.
    per_layer = 2 * 2 * 8 * 16 * 16 * 8
    assert count_flops(model, (1, 8, 8), timestep=0) - without_mapping.get_total_flops() == 4 * per_layer


def test_flops_do_not_depend_on_timestep():
    model = build_unet("digits-8")
    assert count_flops(model, (1, 8, 8), timestep=0) == count_flops(model, (1, 8, 8), timestep=999)
