"""LoRA slots: every backend equals PEFT's own mixed-batch forward; a slot holds only its adapter;
a NaN/inf adapter reaches no other row."""

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from server.lora.pool import BACKENDS, LoraBatch, LoraPool
from server.lora.slots import prepare
from server.lora.weights import AdapterFiles, AdapterInfo
from tests.helpers import tiny_llama

CONFIGS = {
    "alpha": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "beta": LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"], init_lora_weights=False),
    "gamma": LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj", "gate_proj"], init_lora_weights=False,
                        use_rslora=True),
}
ROWS = ["alpha", "__base__", "beta", "gamma", "alpha", "gamma"]


@pytest.fixture(scope="module")
def peft_model():
    base = tiny_llama(300)
    torch.manual_seed(3)
    names = list(CONFIGS)
    peft = get_peft_model(base, CONFIGS[names[0]], adapter_name=names[0])
    for n in names[1:]:
        peft.add_adapter(n, CONFIGS[n])
    return peft.eval()


PER_TOKEN = "per_token"  # the fixed-shape path of CUDA-graph decode steps (LoraBatch.token_slots)


def slotted(peft_model, backend, slots=4):
    """A copy of the base with its linears in slots, and the three adapters loaded in slots 0..2."""
    model = tiny_llama(300)  # the same seed: the same base weights as the PEFT model's
    pool = LoraPool(slots, torch.float32, torch.device("cpu"), "loop" if backend == PER_TOKEN else backend)
    pool.wrap(model, exclude={id(model.lm_head)})
    modules = {n for n, _ in model.named_modules()}
    for slot, name in enumerate(CONFIGS):
        sd = get_peft_model_state_dict(peft_model, adapter_name=name)
        files = AdapterFiles(AdapterInfo(None, 0, 0, (), "", 0), CONFIGS[name], sd)
        pool.write(slot, prepare(name, files, pool, modules).weights)
    return model, pool


def segments(rows, tokens, slot_of):
    segs = []
    for i, a in enumerate(rows):
        if a in slot_of:
            segs.append((slot_of[a], i * tokens, (i + 1) * tokens))
    return segs


def lora_batch(pool, rows, tokens, slot_of, per_token=False):
    if per_token:  # one slot index per token; the base reads the pool's zero slot
        idx = torch.tensor([slot_of.get(a, pool.zero_slot) for a in rows for _ in range(tokens)])
        return LoraBatch([], len(rows) * tokens, torch.device("cpu"), token_slots=idx)
    return LoraBatch(segments(rows, tokens, slot_of), len(rows) * tokens, torch.device("cpu"))


def forward(model, pool, ids, rows, per_token=False):
    slot_of = {n: i for i, n in enumerate(CONFIGS)}
    pool.batch = lora_batch(pool, rows, ids.shape[1], slot_of, per_token)
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits
    finally:
        pool.batch = None


@pytest.mark.parametrize("backend", sorted(BACKENDS) + ["auto", PER_TOKEN])
def test_backends_equal_peft(peft_model, backend):
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (len(ROWS), 7))
    with torch.no_grad():
        ref = peft_model(input_ids=ids, adapter_names=ROWS).logits
    model, pool = slotted(peft_model, backend)
    ours = forward(model, pool, ids, ROWS, per_token=backend == PER_TOKEN)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    with torch.no_grad():
        plain = model(input_ids=ids).logits  # no step context: the base alone
    assert not torch.allclose(plain, ref, atol=1e-3)


@pytest.mark.parametrize("rows", [["alpha"] * 3 + ["beta"] * 3, ["gamma", "gamma", "alpha", "alpha"]])
def test_grouped_rows_take_the_view_path_and_equal_peft(peft_model, rows):
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (len(rows), 1))
    with torch.no_grad():
        ref = peft_model(input_ids=ids, adapter_names=rows).logits
    model, pool = slotted(peft_model, "gathered")
    assert torch.allclose(forward(model, pool, ids, rows), ref, atol=1e-5)


def test_a_new_adapter_in_a_freed_slot_never_sees_its_predecessor(peft_model):
    model, pool = slotted(peft_model, "auto")
    torch.manual_seed(2)
    ids = torch.randint(0, 300, (2, 5))
    # beta (o_proj, down_proj, r=2) leaves slot 1; alpha (q_proj, v_proj, r=4) takes it.
    pool.clear(1)
    modules = {n for n, _ in model.named_modules()}
    sd = get_peft_model_state_dict(peft_model, adapter_name="alpha")
    pool.write(1, prepare("alpha", AdapterFiles(None, CONFIGS["alpha"], sd), pool, modules).weights)
    for name, layer in pool.layers.items():
        if "o_proj" in name or "down_proj" in name:
            assert layer.rank[1] == 0 and float(layer.A[1].abs().sum()) == 0 and float(layer.B[1].abs().sum()) == 0
    with torch.no_grad():
        ref = peft_model(input_ids=ids, adapter_names=["alpha", "alpha"]).logits
    pool.batch = LoraBatch([(1, 0, 10)], 10, torch.device("cpu"))
    try:
        with torch.no_grad():
            ours = model(input_ids=ids).logits
    finally:
        pool.batch = None
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("backend", sorted(BACKENDS) + [PER_TOKEN])
def test_nan_and_inf_in_one_adapter_reach_no_other_row(peft_model, backend):
    """Inserted below the validator: slot 3 holds inf and NaN. Base and clean rows beside it are
    exactly what they are without it (no product over another adapter's weights)."""
    model, pool = slotted(peft_model, backend)
    for layer in pool.layers.values():
        if layer.A is not None:
            layer.A[3, 0] = float("inf")
            layer.B[3, 0] = float("nan")
            layer.rank[3] = 1
    torch.manual_seed(4)
    ids = torch.randint(0, 300, (4, 3))
    clean = ["alpha", "__base__", "gamma", "alpha"]
    want = forward(model, pool, ids, clean)
    slot_of = {n: i for i, n in enumerate(CONFIGS)} | {"bad": 3}
    for rows in (["alpha", "bad", "gamma", "alpha"], ["bad", "__base__", "gamma", "alpha"]):
        pool.batch = lora_batch(pool, rows, 3, slot_of, per_token=backend == PER_TOKEN)
        try:
            with torch.no_grad():
                got = model(input_ids=ids).logits
        finally:
            pool.batch = None
        for i, r in enumerate(rows):
            if r != "bad":
                assert torch.isfinite(got[i]).all()
                assert torch.allclose(got[i], want[i], atol=1e-5), (rows, i)


@pytest.mark.parametrize("backend", ["segments", "gathered", "auto"])
def test_weighted_overlapping_segments_of_a_mix_equal_the_loop(peft_model, backend):
    """A per-request mix is one segment per source over the same tokens, each with its weight."""
    torch.manual_seed(5)
    ids = torch.randint(0, 300, (3, 5))
    segs = [(0, 0, 5), (1, 5, 10, 0.7), (2, 5, 10, -0.4), (0, 10, 15, 0.5)]   # alpha; 0.7 beta - 0.4 gamma; 0.5 alpha
    outs = {}
    for name in ("loop", backend):
        model, pool = slotted(peft_model, name)
        pool.batch = LoraBatch(segs, 15, torch.device("cpu"))
        try:
            with torch.no_grad():
                outs[name] = model(input_ids=ids.view(1, -1)).logits
        finally:
            pool.batch = None
    assert torch.allclose(outs[backend], outs["loop"], atol=1e-4), (outs[backend] - outs["loop"]).abs().max()
    model, pool = slotted(peft_model, "loop")
    plain = forward(model, pool, ids, ["alpha", "__base__", "alpha"])
    assert not torch.allclose(outs["loop"][0, 5:10], plain.view(1, 15, -1)[0, 5:10], atol=1e-3)


def test_the_configs_backend_names_are_the_pools():
    """One list of backend names (server/config.py), each implemented here."""
    from server.config import LORA_BACKENDS
    from server.lora.pool import BACKENDS, LoraPool

    assert set(LORA_BACKENDS) == {"auto", *BACKENDS}
    with pytest.raises(ValueError, match="valid: auto"):
        LoraPool(2, torch.float32, torch.device("cpu"), backend="nope")
