"""Fuzzing config.json: whatever the file holds, reading it either gives a ModelConfig the decoder can be
built from, or raises CheckpointError (the engine's input error, which the commands print as one
`error:` line); nothing else escapes. The known defects, one test each, are in tests/test_config_json.py.

Reading a config is pure Python (microseconds), so a few hundred examples cost well under a second of
work; the per-example deadline (generous: the first build warms up, the machine may be busy) catches
a value that would make parsing or building hang.
"""

import json
import math
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_engine import CheckpointError
from lora_engine.models.builder import build_model
from lora_engine.models.config import ModelConfig
from tests.test_config_json import BASE

# Any JSON value, small: what a corrupted or hostile file can put where a field belongs.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
# Values near the edges of what the fields accept.
EDGES = st.sampled_from([0, -1, 1, 2, 3, 5, 16, 64, 4096, 2**31, 10**7, 10**12, 1.5, 64.0, 1e-300, float("inf"), True,
                         "64", "llama", "llama3", "default", "silu", "bfloat16"])
LLAMA3 = st.fixed_dictionaries({"rope_type": st.just("llama3")}, optional={
    k: EDGES | JSON for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")})
KEYS = [*BASE, "head_dim", "rope_parameters", "rope_scaling", "rope_theta", "sliding_window", "use_sliding_window",
        "attention_bias", "mlp_bias", "pretraining_tp", "num_experts", "torch_dtype"]


@st.composite
def config_files(draw):
    """BASE with a few fields deleted or replaced, or (sometimes) not an object at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    cfg = dict(BASE)
    for key in draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=4, unique=True)):
        if draw(st.booleans()):
            cfg.pop(key, None)
        else:
            cfg[key] = draw(LLAMA3 if key in ("rope_parameters", "rope_scaling") and draw(st.booleans())
                            else EDGES | JSON)
    return cfg


@settings(max_examples=300, deadline=10_000, suppress_health_check=[HealthCheck.too_slow])
@given(config_files())
def test_only_the_engine_error_escapes(cfg):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(cfg))
        try:
            c = ModelConfig.from_hf(path)
        except CheckpointError as e:
            assert str(e).startswith(str(path)), e  # it names the file
            return
    # Accepted: the decoder builds from it (on meta: no storage), and its rotary table is finite.
    if c.num_hidden_layers <= 4:
        model = build_model(c)
        assert all(math.isfinite(f) for f in model.model.rotary_emb._inv_freq().tolist())
