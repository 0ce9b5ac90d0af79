"""Nothing silently wrong, nothing lost, nothing read from outside the checkpoint (issue 45): one test per
class of failure, each asserting that the message names the problem, plus a property test over malformed
inputs."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from kvjax.train.loop import LoopConfig, NonFiniteLossError, check_learning_rate, train

# ------------------------------------------------------------------------------------------------
# Lost or poisoned work: the NaN guard
# ------------------------------------------------------------------------------------------------

TRUE_W = np.array([1.5, -2.0, 0.5, 3.0], np.float32)


def _batch(seed: int, step: int) -> dict:
    rng = np.random.default_rng([seed, step])
    x = rng.normal(size=(16, 4)).astype(np.float32)
    return {"x": x, "y": x @ TRUE_W + 0.7}


def _loss(params, batch, rng):
    pred = jnp.einsum("bi,i->b", batch["x"], params["w"]) + params["b"]
    return jnp.mean((pred - batch["y"]) ** 2), {}


def _params():
    return {"w": jnp.zeros(4), "b": jnp.zeros(())}


def _run(tmp_path, lr: float, steps: int = 12):
    record = {"lr": lr, "model": "regression"}
    return train(
        _params(),
        _loss,
        optax.adam(lr),
        _batch,
        LoopConfig(steps=steps, checkpoint_every=2, progress=False, plot=False),
        tmp_path,
        record=record,
        fixed=("model",),
    )


def test_a_nan_stopped_run_keeps_a_finite_checkpoint_and_resumes_with_a_sane_lr(tmp_path):
    # Adam moves every parameter by about lr per step: 1e30 is finite, but the loss of the params it makes is not.
    with pytest.raises(NonFiniteLossError, match=r"step 1: .*Rerun with other settings") as err:
        _run(tmp_path, 1e30)
    assert "no checkpoint" in str(err.value)
    # A run that blows up later: checkpoints only ever hold params whose loss and gradient were finite.
    good = _run(tmp_path / "b", 1e-2, steps=4)
    assert good.step == 4
    with pytest.raises(NonFiniteLossError, match=r"step 5: .*rolled back to checkpoint 4.*resumes from step 4"):
        _run(tmp_path / "b", 1e30, steps=12)
    manager = ocp.CheckpointManager(tmp_path / "b" / "checkpoints")
    assert manager.latest_step() == 4
    for step in manager.all_steps():
        restored = manager.restore(step)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))
    manager.close()
    # The rerun with a sane learning rate resumes from the good checkpoint, finishes, and records both settings.
    done = _run(tmp_path / "b", 1e-2, steps=12)
    assert done.resumed_from == 4 and done.step == 12 and np.isfinite(done.history[-1]["loss"])
    record = json.loads((tmp_path / "b" / "run.json").read_text())
    assert record["lr"] == 1e-2 and record["resumes"][-1] == {"step": 4, "changed": {"lr": [1e30, 1e-2]}}
    # What may not change on a resume is refused, naming it.
    with pytest.raises(ValueError, match=r"model: 'regression' -> 'other'"):
        train(
            _params(),
            _loss,
            optax.adam(1e-2),
            _batch,
            LoopConfig(steps=14, progress=False, plot=False),
            tmp_path / "b",
            record={"lr": 1e-2, "model": "other"},
            fixed=("model",),
        )
    for bad in (0, -1e-3, float("nan"), float("inf"), "1e-3", True):
        with pytest.raises(ValueError, match="learning rate"):
            check_learning_rate(bad)
