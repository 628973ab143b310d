"""Equivalence with the reference implementation (ncps), the oracle of our cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch

ncps_torch = pytest.importorskip("ncps.torch")
ncps_wirings = pytest.importorskip("ncps.wirings")

from cfc_rl.nn import LTC, AutoNCP, CfC, FullyConnected, from_ncps  # noqa: E402

INPUT = 5


def _cfc(**kwargs):
    return lambda: ncps_torch.CfC(INPUT, 16, **kwargs)


REFERENCES = {
    "cfc_default": _cfc(),
    "cfc_no_gate": _cfc(mode="no_gate"),
    "cfc_pure": _cfc(mode="pure"),
    "cfc_2layers_silu": _cfc(backbone_layers=2, backbone_units=32, activation="silu"),
    "cfc_gelu_dropout": _cfc(
        backbone_layers=3, backbone_units=24, activation="gelu", backbone_dropout=0.2
    ),
    "cfc_mixed_memory": _cfc(mixed_memory=True),
    "cfc_proj_size": _cfc(proj_size=3),
    "cfc_autoncp": lambda: ncps_torch.CfC(INPUT, ncps_wirings.AutoNCP(20, 4, seed=3)),
    "cfc_autoncp_no_gate_mm_proj": lambda: ncps_torch.CfC(
        INPUT, ncps_wirings.AutoNCP(20, 4), mode="no_gate", mixed_memory=True, proj_size=2
    ),
    "cfc_ncp_pure": lambda: ncps_torch.CfC(
        INPUT, ncps_wirings.NCP(6, 5, 3, 3, 3, 4, 2), mode="pure"
    ),
    "ltc_default": lambda: ncps_torch.LTC(INPUT, 12),
    "ltc_autoncp": lambda: ncps_torch.LTC(INPUT, ncps_wirings.AutoNCP(20, 4)),
    "ltc_mixed_memory_linear": lambda: ncps_torch.LTC(
        INPUT,
        12,
        mixed_memory=True,
        input_mapping="linear",
        output_mapping="linear",
        ode_unfolds=3,
    ),
    "ltc_explicit_constraints": lambda: ncps_torch.LTC(INPUT, 10, implicit_param_constraints=False),
}


def _flat(state):
    return torch.cat(state, dim=1) if isinstance(state, tuple) else state


def _as_ncps_state(reference, state):
    return tuple(state.chunk(2, dim=1)) if reference.use_mixed else state


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_outputs_equal_ncps(name: str) -> None:
    torch.manual_seed(0)
    reference = REFERENCES[name]().eval()
    ours = from_ncps(reference)
    assert not ours.training
    x = torch.randn(4, 9, INPUT)
    y_ref, h_ref = reference(x)
    y, h = ours(x)
    assert y.shape == (4, 9, ours.output_size) and h.shape == (4, ours.state_size)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, _flat(h_ref), atol=1e-5, rtol=0)

    # From a given state, with one elapsed time for all (a (1, T) tensor: ncps squeezes it).
    state = torch.randn(4, ours.state_size) * 0.5
    y_ref, h_ref = reference(x, _as_ncps_state(reference, state), timespans=torch.full((1, 9), 0.3))
    y, h = ours(x, state, timespans=0.3)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, _flat(h_ref), atol=1e-5, rtol=0)

    # Varying elapsed times (batch of one: the only case ncps handles per sample).
    x1, ts1 = x[:1], torch.rand(1, 9) * 2.0 + 0.05
    y_ref, h_ref = reference(x1, timespans=ts1)
    y, h = ours(x1, timespans=ts1)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(h, _flat(h_ref), atol=1e-5, rtol=0)


def test_parameter_counts_equal_ncps() -> None:
    for name, build in REFERENCES.items():
        reference = build()
        ours = from_ncps(reference)
        trainable = sum(p.numel() for p in reference.parameters() if p.requires_grad)
        assert sum(p.numel() for p in ours.parameters()) == trainable, name


def test_gradients_equal_ncps() -> None:
    torch.manual_seed(1)
    reference = ncps_torch.CfC(INPUT, ncps_wirings.AutoNCP(16, 3), mixed_memory=True)
    ours = from_ncps(reference)
    x = torch.randn(3, 6, INPUT)
    reference(x)[0].square().sum().backward()
    ours(x)[0].square().sum().backward()
    # Fused heads: compare ff1's gradient with the first block of ours.
    cell = reference.rnn_cell._layers[0]
    hidden = cell.hidden_size
    torch.testing.assert_close(
        ours.layers[0].heads.weight.grad[:hidden], cell.ff1.weight.grad, atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        ours.memory.recurrent_map.weight.grad,
        reference.lstm.recurrent_map.weight.grad,
        atol=1e-5,
        rtol=1e-4,
    )


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: AutoNCP(32, 4), lambda: ncps_wirings.AutoNCP(32, 4)),
        (lambda: AutoNCP(20, 3, 0.3, seed=7), lambda: ncps_wirings.AutoNCP(20, 3, 0.3, seed=7)),
        (lambda: AutoNCP(64, 8, 0.9, seed=1), lambda: ncps_wirings.AutoNCP(64, 8, 0.9, seed=1)),
        (lambda: FullyConnected(8, 3), lambda: ncps_wirings.FullyConnected(8, 3)),
    ],
)
def test_wirings_equal_ncps_for_the_same_seed(ours, theirs) -> None:
    a, b = ours(), theirs()
    a.build(INPUT)
    b.build(INPUT)
    np.testing.assert_array_equal(a.adjacency_matrix, b.adjacency_matrix)
    np.testing.assert_array_equal(a.sensory_adjacency_matrix, b.sensory_adjacency_matrix)
    assert a.output_dim == b.output_dim
    for layer in range(b.num_layers):
        assert a.get_neurons_of_layer(layer) == list(b.get_neurons_of_layer(layer))


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: CfC(17, 64), lambda: ncps_torch.CfC(17, 64)),
        (lambda: CfC(17, 64, mode="pure"), lambda: ncps_torch.CfC(17, 64, mode="pure")),
        (lambda: CfC(17, 64, mixed_memory=True), lambda: ncps_torch.CfC(17, 64, mixed_memory=True)),
        (lambda: LTC(17, 48), lambda: ncps_torch.LTC(17, 48)),
    ],
)
def test_initialisation_follows_the_reference_distributions(ours, theirs) -> None:
    """Each tensor of a fresh model has the spread of the same tensor of a fresh ncps model
    (reached through from_ncps, which maps their tensors onto ours)."""
    torch.manual_seed(0)
    fresh = dict(ours().named_parameters())
    reference = dict(from_ncps(theirs()).named_parameters())
    assert fresh.keys() == reference.keys()
    for name, value in fresh.items():
        expected = reference[name]
        assert value.shape == expected.shape, name
        if name in ("erev", "sensory_erev"):  # polarities of the wiring, same seed
            torch.testing.assert_close(value, expected)
            continue
        for stat in (torch.mean, torch.std, torch.amax, torch.amin):
            if value.numel() < 32 and stat is torch.std:
                continue
            got, want = stat(value.detach()).item(), stat(expected.detach()).item()
            scale = max(expected.detach().abs().max().item(), 1e-6)
            assert abs(got - want) <= 0.2 * scale, (name, stat.__name__, got, want)


def test_from_ncps_rejects_other_modules() -> None:
    with pytest.raises(TypeError, match=r"ncps\.torch\.CfC or ncps\.torch\.LTC"):
        from_ncps(torch.nn.LSTM(3, 4))
    with pytest.raises(ValueError, match="batch_first"):
        from_ncps(ncps_torch.CfC(3, 4, batch_first=False))
