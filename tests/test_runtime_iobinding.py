"""IOBinding in the ONNX Runtime backend, on the CPU provider: the device-resident code path
(state as OrtValues fed from one step to the next, beam reordering by a device Gather) gives
exactly the results of the plain path. Graphs are built by hand with ``onnx.helper``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bbservice import runtime
from bbservice.decoding import beam_search, greedy, sample, sample_gate_passes
from bbservice.music_generation import GenerationParams, generate_rolls

S, P, C, A, H, E, V = 4, 16, 3, 5, 6, 4, 9  # image side, positions, channels, attention, ...


def _save(nodes, name, inputs, outputs, weights: dict[str, np.ndarray], path: Path) -> Path:
    inits = [
        numpy_helper.from_array(w if w.dtype == np.int64 else w.astype(np.float32), k)
        for k, w in weights.items()
    ]
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return path


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def caption_graphs(folder: Path, seed: int = 0) -> list[Path]:
    """A stand-in caption model: an encoder (images → P×C features), an init (projection and
    state) and an attention step whose beams really diverge (random weights)."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: rng.normal(0, 1.0, shape)  # noqa: E731
    enc = _save(
        [
            helper.make_node("Reshape", ["images", "shape"], ["flat"]),
            helper.make_node("Transpose", ["flat"], ["features"], perm=[0, 2, 1]),
        ],
        "caption_encoder",
        [_vi("images", ["B", 3, S, S])],
        [_vi("features", ["B", P, C])],
        {"shape": np.array([0, 3, P], np.int64)},
        folder / "enc.onnx",
    )
    init = _save(
        [
            helper.make_node("MatMul", ["features", "Wa"], ["projected"]),
            helper.make_node("ReduceMean", ["features", "ax1"], ["mean"], keepdims=0),
            helper.make_node("MatMul", ["mean", "Wh"], ["hpre"]),
            helper.make_node("Tanh", ["hpre"], ["h"]),
            helper.make_node("MatMul", ["mean", "Wc"], ["c"]),
        ],
        "caption_init",
        [_vi("features", ["B", P, C])],
        [_vi("projected", ["B", P, A]), _vi("h", ["B", H]), _vi("c", ["B", H])],
        {"Wa": w(C, A), "Wh": w(C, H), "Wc": w(C, H), "ax1": np.array([1], np.int64)},
        folder / "init.onnx",
    )
    step_nodes = [
        helper.make_node("Gather", ["Emb", "tokens"], ["emb"], axis=0),
        helper.make_node("MatMul", ["h", "Wq"], ["q"]),
        helper.make_node("Unsqueeze", ["q", "ax1"], ["q3"]),
        helper.make_node("Mul", ["projected", "q3"], ["pq"]),
        helper.make_node("ReduceSum", ["pq", "ax2"], ["scores"], keepdims=0),
        helper.make_node("Softmax", ["scores"], ["attention"], axis=1),
        helper.make_node("Unsqueeze", ["attention", "ax2"], ["att3"]),
        helper.make_node("Mul", ["features", "att3"], ["fa"]),
        helper.make_node("ReduceSum", ["fa", "ax1"], ["context"], keepdims=0),
        helper.make_node("MatMul", ["emb", "We"], ["a1"]),
        helper.make_node("MatMul", ["h", "Whh"], ["a2"]),
        helper.make_node("MatMul", ["context", "Wx"], ["a3"]),
        helper.make_node("Sum", ["a1", "a2", "a3"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["h_out"]),
        helper.make_node("Add", ["c", "h_out"], ["c_out"]),
        helper.make_node("MatMul", ["h_out", "Wo"], ["logits"]),
        helper.make_node("LogSoftmax", ["logits"], ["log_probs"], axis=1),
    ]
    step = _save(
        step_nodes,
        "caption_step",
        [
            _vi("tokens", ["N"], TensorProto.INT64),
            _vi("h", ["N", H]),
            _vi("c", ["N", H]),
            _vi("features", ["N", P, C]),
            _vi("projected", ["N", P, A]),
        ],
        [
            _vi("log_probs", ["N", V]),
            _vi("h_out", ["N", H]),
            _vi("c_out", ["N", H]),
            _vi("attention", ["N", P]),
        ],
        {
            "Emb": w(V, E),
            "Wq": w(H, A),
            "We": w(E, H),
            "Whh": w(H, H),
            "Wx": w(C, H),
            "Wo": 3 * w(H, V),
            "ax1": np.array([1], np.int64),
            "ax2": np.array([2], np.int64),
        },
        folder / "step.onnx",
    )
    return [enc, init, step]


@pytest.fixture(scope="module")
def caption_sessions(tmp_path_factory):
    folder = tmp_path_factory.mktemp("caption")
    return [runtime.make_session(p, "cpu") for p in caption_graphs(folder)]


def _steppers(sessions):
    plain = runtime.OnnxCaptionStepper(*sessions)
    bound = runtime.OnnxCaptionStepper(*sessions, io_binding=True)
    return plain, bound


def _same(a, b):
    assert [h.tokens for h in a] == [h.tokens for h in b]
    np.testing.assert_array_equal([h.log_prob for h in a], [h.log_prob for h in b])


def test_gather_model_is_valid_onnx_and_gathers_rows():
    model = onnx.load_from_string(runtime.gather_rows_model(TensorProto.FLOAT))
    assert [n.op_type for n in model.graph.node] == ["Gather"]
    ops = runtime.DeviceOps("cpu", ["CPUExecutionProvider"])
    x = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
    d = ops.to_device(x)
    np.testing.assert_array_equal(np.asarray(np.take(d, [3, 0, 0], axis=0)), x[[3, 0, 0]])
    repeated = np.repeat(d, 2, axis=0)
    assert isinstance(repeated, runtime.DeviceArray) and repeated.shape == (8, 3, 2)
    np.testing.assert_array_equal(np.asarray(repeated), np.repeat(x, 2, axis=0))
    half = ops.to_device(x.astype(np.float16))
    np.testing.assert_array_equal(np.asarray(np.take(half, [1], axis=0)), x[[1]].astype(np.float16))
    # anything else is computed on a host copy
    np.testing.assert_array_equal(np.concatenate([d, d]), np.concatenate([x, x]))


def test_caption_state_stays_on_the_device_between_steps(caption_sessions):
    _, bound = _steppers(caption_sessions)
    images = np.random.default_rng(1).normal(size=(2, 3, S, S)).astype(np.float32)
    state = bound.start(images)
    assert all(isinstance(v, runtime.DeviceArray) for v in state.values())
    log_probs, state, attention = bound.step(np.array([1, 2]), state)
    assert isinstance(log_probs, np.ndarray) and log_probs.shape == (2, V)
    assert isinstance(attention, np.ndarray) and attention.shape == (2, P)
    assert isinstance(state["h"], runtime.DeviceArray) and state["h"].shape == (2, H)
    assert bound.io_binding and bound.device == "cpu"


def test_binding_equals_plain_on_every_decoder(caption_sessions):
    plain, bound = _steppers(caption_sessions)
    images = np.random.default_rng(2).normal(size=(3, 3, S, S)).astype(np.float32)
    kw = dict(start_id=1, end_id=2, max_length=7)
    _same(greedy(plain, images, **kw), greedy(bound, images, **kw))
    a = beam_search(plain, images, beam_size=3, n_best=2, **kw)
    b = beam_search(bound, images, beam_size=3, n_best=2, **kw)
    for x, y in zip(a, b, strict=True):
        _same(x, y)
    a = sample(plain, images, n_samples=2, rng=5, **kw)
    b = sample(bound, images, n_samples=2, rng=5, **kw)
    for x, y in zip(a, b, strict=True):
        _same(x, y)
    s1, _ = plain.start(images), None
    s2 = bound.start(images)
    for key in s1:
        np.testing.assert_array_equal(s1[key], np.asarray(s2[key]))
    # encoder features given directly take the same path
    features = plain.encode(images)
    _same(greedy(plain, features, **kw), greedy(bound, features, **kw))


def test_binding_auto_is_off_on_the_cpu_provider(caption_sessions):
    plain, _ = _steppers(caption_sessions)
    assert not plain.io_binding and plain.device == "cpu"


def test_wrong_image_size_is_refused_on_the_bound_path(caption_sessions):
    _, bound = _steppers(caption_sessions)
    with pytest.raises(runtime.ConfigError, match="images must be"):
        bound.start(np.zeros((1, 3, S + 1, S + 1), np.float32))


def test_gate_passes_equal(caption_sessions):
    plain, bound = _steppers(caption_sessions)
    images = np.random.default_rng(3).normal(size=(1, 3, S, S)).astype(np.float32)
    kw = dict(start_id=1, end_id=2, max_length=6, passes=3)
    a = sample_gate_passes(plain, images, **kw)
    b = sample_gate_passes(bound, images, **kw)
    assert repr(a) == repr(b)


def _music_graph(path: Path) -> Path:
    L, Hm = 2, 4
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["frame", "W"], ["x"]),
        helper.make_node("Add", ["h", "x"], ["hx"]),
        helper.make_node("Tanh", ["hx"], ["h_out"]),
        helper.make_node("Add", ["c", "h_out"], ["c_out"]),
        helper.make_node("ReduceSum", ["h_out", "ax0"], ["hs"], keepdims=0),
        helper.make_node("MatMul", ["hs", "Wo"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["probs"]),
    ]
    path = _save(
        nodes,
        "music_step",
        [_vi("frame", ["B", 88]), _vi("h", [L, "B", Hm]), _vi("c", [L, "B", Hm])],
        [_vi("probs", ["B", 88]), _vi("h_out", [L, "B", Hm]), _vi("c_out", [L, "B", Hm])],
        {
            "W": rng.normal(0, 0.3, (88, Hm)),
            "Wo": rng.normal(0, 1, (Hm, 88)),
            "ax0": np.array([0], np.int64),
        },
        path,
    )
    return path


def test_music_binding_equals_plain(tmp_path):
    session = runtime.make_session(_music_graph(tmp_path / "m.onnx"), "cpu")
    plain = runtime.OnnxMusicStepper(session)
    bound = runtime.OnnxMusicStepper(session, io_binding=True)
    assert isinstance(bound.start(2)["h"], runtime.DeviceArray)
    params = GenerationParams(frames=24, num_outputs=2, seed=3)
    np.testing.assert_array_equal(generate_rolls(plain, params), generate_rolls(bound, params))
