import pytest
import torch
from types import SimpleNamespace

from ankus.data.tokens import pad_id, position_ids_from_mask
from ankus.models.layers import find_decoder_layers


@pytest.mark.parametrize("pad,eos,want", [(3, 7, 3), (None, 7, 7), (None, [9, 2], 9), (None, None, 0), (0, 5, 0)])
def test_pad_id_rule(pad, eos, want):
    assert pad_id(SimpleNamespace(pad_token_id=pad, eos_token_id=eos)) == want


def test_position_ids_skip_left_padding():
    am = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids_from_mask(am).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_decoder_layers_prefers_the_shallowest_list_of_the_configured_length():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_hidden_layers=3)
            self.layers = torch.nn.ModuleList(Block() for _ in range(3))

    m = Model()
    name, layers = find_decoder_layers(m)
    assert name == "layers" and layers is m.layers
