"""The batched multi-adapter LoRA forward: every backend equals PEFT's own mixed-batch forward."""

import pytest
import torch

from server.lora.batched import BASE, BACKENDS, BatchedLora
from tests.helpers import tiny_llama


@pytest.fixture(scope="module")
def model():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(300)
    torch.manual_seed(3)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False), adapter_name="alpha")
    peft.add_adapter("beta", LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"],
                                        init_lora_weights=False))
    peft.add_adapter("gamma", LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj", "gate_proj"],
                                         init_lora_weights=False, use_rslora=True))
    return peft.eval()


ROWS = ["alpha", BASE, "beta", "gamma", "alpha", "gamma"]


def reference(model, ids):
    model.base_model.enable_adapter_layers()
    with torch.no_grad():
        out = model(input_ids=ids, adapter_names=ROWS).logits
    return out


@pytest.mark.parametrize("backend", sorted(BACKENDS) + ["auto"])
def test_backends_equal_peft(model, backend):
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (len(ROWS), 7))
    ref = reference(model, ids)
    model.base_model.disable_adapter_layers()
    bl = BatchedLora(model, backend=backend)
    try:
        bl.set_rows(ROWS)
        with torch.no_grad():
            ours = model(input_ids=ids).logits
    finally:
        bl.detach()
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    with torch.no_grad():  # and the hooks are gone: plain base output
        base_only = model(input_ids=ids).logits
    assert not torch.allclose(base_only, ref, atol=1e-3)


def test_all_base_rows_add_nothing(model):
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (3, 5))
    model.base_model.disable_adapter_layers()
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    bl = BatchedLora(model)
    try:
        bl.set_rows([BASE] * 3)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, plain)
    finally:
        bl.detach()


def test_unknown_backend_is_refused(model):
    with pytest.raises(ValueError, match="valid"):
        BatchedLora(model, backend="cuda-magic")


def test_rows_grouped_by_adapter_take_the_view_path_and_equal_peft():
    """Balanced, contiguous groups (how the engine orders a batch that joins together): no gather."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    peft = get_peft_model(tiny_llama(300), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False), adapter_name="a")
    peft.add_adapter("b", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.eval()
    rows = ["a", "a", "b", "b"]
    for tokens in (1, 5):
        ids = torch.randint(0, 300, (len(rows), tokens))
        with torch.no_grad():
            ref = peft(input_ids=ids, adapter_names=rows).logits
        peft.base_model.disable_adapter_layers()
        bl = BatchedLora(peft, backend="gathered")
        try:
            bl.set_rows(rows)
            with torch.no_grad():
                ours = peft(input_ids=ids).logits
            assert bl.gather_index(("a", "b"), tokens, ids.device)[4] is True  # the identity case was used
        finally:
            bl.detach()
            peft.base_model.enable_adapter_layers()
        assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
