"""cmtl.core.adapters: peft's LoRA key format (one parser and its inverse) and the per-row LoRA hook."""

import pytest
import torch

from cmtl.core.adapters import (
    PEFT_PREFIX,
    TaskLoRA,
    add_row_lora,
    hook_row_lora,
    lora_factors,
    lora_key,
    lora_shapes,
    lora_state,
    stack_lora,
    unchanged,
)
from cmtl.errors import DataError


def _state(*modules: str, r: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    out = {}
    for i, module in enumerate(modules):
        out[f"{module}.lora_A.weight"] = torch.randn(r, 4 + i)
        out[f"{module}.lora_B.weight"] = torch.randn(3 + i, r)
    return out


def test_lora_key_reads_peft_keys_only():
    assert lora_key(f"{PEFT_PREFIX}encoder.layer.0.attention.self.query.lora_A.weight") == (
        f"{PEFT_PREFIX}encoder.layer.0.attention.self.query", "A")
    assert lora_key("m.lora_B.weight") == ("m", "B")
    for other in ("m.weight", "m.lora_A.default.weight", "lora_A.weight", "m.lora_C.weight", "m.lora_A.bias"):
        assert lora_key(other) is None, other


def test_state_factors_state_round_trip():
    state = _state(f"{PEFT_PREFIX}layer.0.query", f"{PEFT_PREFIX}layer.0.value")
    factors = lora_factors(state)
    assert list(factors) == [f"{PEFT_PREFIX}layer.0.query", f"{PEFT_PREFIX}layer.0.value"]  # order of appearance
    a, b = factors[f"{PEFT_PREFIX}layer.0.value"]
    assert a is state[f"{PEFT_PREFIX}layer.0.value.lora_A.weight"] and b.shape == (4, 2)
    back = lora_state(factors)
    assert list(back) == list(state)
    for key in state:
        assert back[key] is state[key]
    assert lora_shapes(state) == {f"{PEFT_PREFIX}layer.0.query": (4, 3), f"{PEFT_PREFIX}layer.0.value": (5, 4)}


def test_unchanged_means_every_module_has_a_zero_factor():
    state = _state("m", "n")
    assert not unchanged(state)
    fresh = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in state.items()}  # peft's start
    assert unchanged(fresh)
    assert unchanged({**fresh, "n.lora_A.weight": torch.zeros(2, 5), "n.lora_B.weight": state["n.lora_B.weight"]})
    assert not unchanged({**fresh, "n.lora_B.weight": state["n.lora_B.weight"]})  # one module moved


def test_parser_refuses_other_keys_and_incomplete_pairs():
    state = _state("m")
    with pytest.raises(DataError, match=r"Unexpected key 'm.weight' in a LoRA state dict: only lora_A / lora_B"):
        lora_factors({**state, "m.weight": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match=r"Modules \['m'\] lack lora_A or lora_B weights"):
        lora_factors({"m.lora_A.weight": state["m.lora_A.weight"]})
    with pytest.raises(DataError, match="lack lora_A or lora_B"):
        lora_shapes({"m.lora_B.weight": state["m.lora_B.weight"]})
    with pytest.raises(DataError, match="only lora_A / lora_B"):
        stack_lora([({**state, "m.x": torch.zeros(1)}, 1.0), ({**state, "m.x": torch.zeros(1)}, 0.5)])
    with pytest.raises(DataError, match="must adapt the same modules"):
        stack_lora([(state, 1.0), (_state("n"), 1.0)])


def test_stack_lora_sums_the_parts_deltas():
    one, two = _state("m", "n"), _state("m", "n", r=3)
    stacked = stack_lora([(one, 0.5), (two, 2.0)])
    assert list(stacked) == sorted(stacked)
    for module, (a, b) in lora_factors(stacked).items():
        (a1, b1), (a2, b2) = lora_factors(one)[module], lora_factors(two)[module]
        assert a.shape[0] == 5
        torch.testing.assert_close(b @ a, 0.5 * b1 @ a1 + 2.0 * b2 @ a2)


@pytest.mark.parametrize("scaling", [None, 2.0])
def test_row_lora_equals_a_loop_over_rows(scaling):
    torch.manual_seed(0)
    x, out = torch.randn(3, 5, 4), torch.randn(3, 5, 6)  # (B, T, in), (B, T, out)
    a, b = torch.randn(3, 2, 4), torch.randn(3, 6, 2)  # per row: (r, in), (out, r)
    got = add_row_lora(out, x, a, b, scaling)
    for row in range(3):
        want = out[row] + (1.0 if scaling is None else scaling) * x[row] @ (b[row] @ a[row]).T
        torch.testing.assert_close(got[row], want, atol=1e-6, rtol=1e-6)


def test_hook_row_lora_adds_the_rows_delta_only_when_asked():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 6)
    x = torch.randn(3, 5, 4)
    plain = layer(x)
    a, b = torch.randn(3, 2, 4), torch.randn(3, 6, 2)
    current: list = [None]
    handle = hook_row_lora(layer, lambda: current[0])
    torch.testing.assert_close(layer(x), plain)  # None: nothing added
    current[0] = (a, b, 0.5)
    hooked = layer(x)
    for row in range(3):
        torch.testing.assert_close(hooked[row], plain[row] + 0.5 * x[row] @ (b[row] @ a[row]).T, atol=1e-6, rtol=1e-6)
    handle.remove()
    torch.testing.assert_close(layer(x), plain)


def test_task_lora_state_is_peft_form():
    own = TaskLoRA({"x.query": (4, 3), "x.value": (4, 5)}, num_tasks=2, r=2, alpha=4.0)
    state = own.state(1)
    assert list(state) == ["x.query.lora_A.weight", "x.query.lora_B.weight", "x.value.lora_A.weight",
                           "x.value.lora_B.weight"]
    assert lora_shapes(state) == {"x.query": (4, 3), "x.value": (4, 5)}
    torch.testing.assert_close(state["x.value.lora_A.weight"], own.A[1][1].detach())
