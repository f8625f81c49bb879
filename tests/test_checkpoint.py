"""fewshot.training.checkpoint: atomic save, weights_only load, RNG round trip, metadata check, prefixes."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from fewshot.training.checkpoint import (
    ModelSpec,
    capture_rng_state,
    check_model_spec,
    load_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
    strip_prefixes,
)


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist(), float(np.random.randn())


def test_save_is_atomic_and_loads_weights_only(tmp_path):
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [2, 4])
    path = save_checkpoint(
        tmp_path / "ck.pt",
        model=model,
        meta=ModelSpec("conv4", "net", 8),
        optimizer=opt.state_dict(),
        scheduler=sched.state_dict(),
        progress={"epoch": 3},
        rng=[capture_rng_state()],
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]
    ck = load_checkpoint(path)
    assert ck["format"] == "fewshot-checkpoint" and ck["progress"] == {"epoch": 3}
    assert ck["meta"]["acdc"] == "net" and ck["meta"]["atoms"] == 8
    assert all(torch.equal(a, b) for a, b in zip(ck["model"].values(), model.state_dict().values()))
    opt2 = torch.optim.SGD(tiny(1).parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ck["optimizer"])
    assert torch.equal(
        opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"]
    )


def test_failed_save_keeps_the_old_file(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", progress={"epoch": 1})
    with pytest.raises((pickle.PicklingError, AttributeError)):  # what pickle raises for a lambda
        save_checkpoint(path, progress={"epoch": 2}, bad=lambda: 0)  # a function cannot be pickled
    assert load_checkpoint(path)["progress"] == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


def test_rng_round_trip_reproduces_every_generator():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draws()
    state = capture_rng_state()
    first = draws()
    draws()
    restore_rng_state(state)
    assert draws() == first
    # The state survives a weights_only save/load.
    restore_rng_state(state)
    import io

    buf = io.BytesIO()
    torch.save({"rng": state}, buf)
    buf.seek(0)
    restore_rng_state(torch.load(buf, weights_only=True)["rng"])
    assert draws() == first


def test_spec_check_names_both_architectures(tmp_path):
    saved = ModelSpec("resnet18_cifar", "net", 8, num_classes=10)
    check_model_spec(saved.to_dict(), ModelSpec("resnet18_cifar", "net", 8, None, 10), "x.pt")
    # atoms and group size do not matter for a dense network
    check_model_spec(ModelSpec("conv4", None, 8).to_dict(), ModelSpec("conv4", "none", 16), "x.pt")
    with pytest.raises(ValueError) as err:
        check_model_spec(saved.to_dict(), ModelSpec("resnet18_cifar", "block", 12, num_classes=10), "x.pt")
    assert str(err.value) == (
        "checkpoint 'x.pt' was saved for backbone=resnet18_cifar, acdc=net, atoms=8, num_classes=10; "
        "you asked for backbone=resnet18_cifar, acdc=block, atoms=12, num_classes=10 (differs in: acdc, atoms)"
    )
    with pytest.raises(ValueError, match="differs in: backbone, acdc"):
        check_model_spec(saved.to_dict(), ModelSpec("vgg16_cifar", None, num_classes=10), "x.pt")
    check_model_spec(
        saved.to_dict(), ModelSpec("resnet18_cifar", "net", 8, num_classes=100), "x.pt", ignore=("num_classes",)
    )
    with pytest.raises(ValueError, match="holds no model metadata"):
        check_model_spec(None, saved, "x.pt")


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "is empty (0 bytes), not a saved checkpoint"),
        (b"\x80", "cannot be loaded with weights_only=True: "),  # truncated: the reason is never blank
        (b"not a checkpoint", "cannot be loaded with weights_only=True: "),
    ],
)
def test_a_damaged_checkpoint_is_one_line_with_a_reason(tmp_path, content, reason):
    path = tmp_path / "ck.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"checkpoint {str(path)!r} ") and reason in message
    assert message.split(reason, 1)[1].strip() or reason.endswith("checkpoint")  # a reason follows


def test_ddp_prefixes_are_stripped_and_state_loads_into_plain_module(tmp_path):
    model = tiny(0)
    prefixed = {"module." + k: v for k, v in model.state_dict().items()}
    assert list(strip_prefixes(prefixed)) == list(model.state_dict())
    assert list(strip_prefixes({"module._orig_mod.a": 1})) == ["a"]
    other = tiny(5)
    load_model_state(other, prefixed)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))


def test_ddp_checkpoint_has_no_prefix_and_loads_in_one_process(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(tiny(0))
        assert all(k.startswith("module.") for k in ddp.state_dict())
        save_checkpoint(tmp_path / "ck.pt", model=ddp)
    finally:
        dist.destroy_process_group()
    state = load_checkpoint(tmp_path / "ck.pt")["model"]
    assert list(state) == list(tiny(0).state_dict())
    plain = tiny(3)
    load_model_state(plain, state)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ddp.module.state_dict().values()))


def test_mismatched_state_names_the_keys_and_shapes():
    model = tiny(0)
    state = model.state_dict()
    state["0.weight"] = torch.zeros(5, 3, 3, 3)
    state.pop("3.bias")
    with pytest.raises(ValueError) as err:
        load_model_state(tiny(1), state, source="checkpoint 'a.pt'")
    msg = str(err.value)
    assert msg.startswith("checkpoint 'a.pt' does not fit the model Sequential: missing keys [3.bias] (1 in all)")
    assert "shape mismatches (checkpoint vs model) [0.weight (5, 3, 3, 3) vs (4, 3, 3, 3)] (1 in all)" in msg


def test_bare_state_dict_and_foreign_files(tmp_path):
    model = tiny(0)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    assert list(load_checkpoint(tmp_path / "bare.pt")["model"]) == list(model.state_dict())
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="neither a fewshot checkpoint nor a state dict"):
        load_checkpoint(tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be loaded with weights_only=True"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint '.*missing.pt' does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
