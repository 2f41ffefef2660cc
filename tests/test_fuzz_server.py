"""Property-based fuzzing of the live server's ModelInfer with hypothesis.

Random ModelInferRequests (model names and versions, datatypes, shapes with negative, zero, huge and
overflowing dims, right and wrong byte counts, raw and typed contents mixed, requested outputs and
parameters) go to one real server. An independent oracle, written from DESIGN.md's rules, says what
each request deserves: NOT_FOUND, INVALID_ARGUMENT or OK. The server must answer exactly that, with a
message; OK answers must carry the numpy reference outputs. Afterwards no process was replaced, the
server's memory did not grow (a declared huge shape must not allocate) and its log has no traceback.
"""

from __future__ import annotations

import collections
import math
import re
import urllib.request
from dataclasses import dataclass, field

import grpc
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.reference import reference_outputs
from tests.server import ServerProcess, start

Request = service_pb2.ModelInferRequest
Tensor = service_pb2.ModelInferRequest.InferInputTensor
Contents = service_pb2.InferTensorContents
Output = service_pb2.ModelInferRequest.InferRequestedOutputTensor

EXAMPLES_RUN = 1000
RSS_GROWTH_LIMIT = 100 << 20
TIMEOUT_S = 20

# The loaded models as the oracle sees them: inputs (name, datatype, dims without batch), outputs, max batch.
MODELS = {
    "tiny": {"inputs": [("x", "FP32", (16,))], "outputs": ["y"], "max_batch": 256},
    "mixed": {"inputs": [("ids", "INT64", (8,)), ("scale", "FP16", (4,))], "outputs": ["sum", "scaled"],
              "max_batch": 32},
}
ITEMSIZE = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4,
            "INT64": 8, "FP16": 2, "BF16": 2, "FP32": 4, "FP64": 8}
NUMPY = {"FP32": np.float32, "INT64": np.int64, "FP16": np.float16}
TYPED_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
               "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
               "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
               "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
          "fp32_contents", "fp64_contents", "bytes_contents")
DATATYPES = [*ITEMSIZE, "BYTES"]
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED}

# ---------------------------------------------------------------------------------- strategies
odd_names = st.sampled_from(["", "..", "../tiny", "tiny/..", "/tiny", "tiny/1", " tiny", "TINY", "tiny\x00",
                             "mlp", "convnet", "t\u0131ny", "\u202etiny", "\U0001f600", "%2e%2e", "tiny" * 64])
model_names = st.one_of(st.sampled_from(["tiny", "mixed"]), st.sampled_from(["tiny", "mixed"]), odd_names,
                        st.text(max_size=12))
versions = st.one_of(st.just(""), st.just("1"), st.sampled_from(["0", "2", "-1", "01", " 1", "latest", "1.0",
                                                                  "9" * 30]), st.text(max_size=6))
odd_datatypes = st.one_of(st.sampled_from(DATATYPES),
                          st.sampled_from(["", "fp32", "FLOAT32", "FP32 ", "TYPE_FP32", "F\u0050\u0033\u0032x"]),
                          st.text(max_size=6))
odd_dims = st.one_of(st.integers(0, 4), st.sampled_from([-1, -16, 2**31, 2**32 + 16, 2**62, 2**63 - 1,
                                                         -(2**63), 257, 33, 16, 8, 4]),
                     st.integers(-(2**63), 2**63 - 1))
params = st.dictionaries(
    st.one_of(st.sampled_from(["shared_memory_region", "classification", "priority", "timeout",
                               "binary_data_output", "sequence_id"]), st.text(max_size=8)),
    st.one_of(st.builds(service_pb2.InferParameter, bool_param=st.booleans()),
              st.builds(service_pb2.InferParameter, int64_param=st.integers(-(2**63), 2**63 - 1)),
              st.builds(service_pb2.InferParameter, string_param=st.text(max_size=8)),
              st.builds(service_pb2.InferParameter, double_param=st.floats()),
              st.builds(service_pb2.InferParameter, uint64_param=st.integers(0, 2**64 - 1))),
    max_size=2)


def _random_bytes(draw: st.DrawFn, n: int) -> bytes:
    """n bytes from a drawn seed: fast for kilobytes, where st.binary would dominate the run time."""
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(n)


def _typed_values(draw: st.DrawFn, name: str, n: int) -> list:
    if n > 64:  # a full batch of typed values: seeded numpy keeps the draw cheap
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        if name == "bytes_contents":
            return [b"ab"] * n
        if name in ("fp32_contents", "fp64_contents"):
            return rng.standard_normal(n).tolist()
        hi = {"bool_contents": 2, "int_contents": 2**31, "int64_contents": 2**62, "uint_contents": 2**32,
              "uint64_contents": 2**63}[name]
        values = rng.integers(0, hi, n)
        return [bool(v) for v in values] if name == "bool_contents" else values.tolist()
    if name == "bool_contents":
        return draw(st.lists(st.booleans(), min_size=n, max_size=n))
    if name == "bytes_contents":
        return draw(st.lists(st.binary(max_size=4), min_size=n, max_size=n))
    if name in ("fp32_contents", "fp64_contents"):
        return draw(st.lists(st.floats(width=32 if name == "fp32_contents" else 64), min_size=n, max_size=n))
    lo, hi = {"int_contents": (-(2**31), 2**31 - 1), "int64_contents": (-(2**63), 2**63 - 1),
              "uint_contents": (0, 2**32 - 1), "uint64_contents": (0, 2**64 - 1)}[name]
    return draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))


# Ways a request can go wrong; each request gets none (a third of them), one or two.
FAULTS = ("datatype", "dim", "rank", "input_name", "byte_count", "typed_field", "typed_count", "typed_and_raw",
          "input_params", "extra_input", "permute", "drop_input", "raw_entries", "output_name", "output_params")


def _raw_data(draw: st.DrawFn, datatype: str, nbytes: int) -> bytes:
    if datatype == "INT64" and nbytes % 8 == 0:
        # ONNX Runtime's CPU ReduceSum accumulates INT64 in double (sums beyond 2**53 round, overflow
        # saturates): values stay where mixed's 8-element sums are exact, so OK answers can be compared.
        seed = draw(st.integers(0, 2**32 - 1))
        return np.random.default_rng(seed).integers(-(2**49), 2**49, nbytes // 8).tobytes()
    return _random_bytes(draw, min(nbytes, 1 << 16))


@st.composite
def infer_requests(draw: st.DrawFn) -> Request:
    """Well-formed requests for tiny or mixed, each with zero, one or two faults from FAULTS."""
    target = draw(st.sampled_from(["tiny", "mixed"]))
    cfg = MODELS[target]
    faults = draw(st.frozensets(st.sampled_from(FAULTS), min_size=1, max_size=2)) if draw(st.integers(0, 2)) else set()
    victim = draw(st.integers(0, len(cfg["inputs"]) - 1))  # the input that per-input faults hit

    def bad(kind: str, index: int | None = None) -> bool:
        return kind in faults and index in (None, victim)

    # model and version are corrupted on their own, often enough that every run has NOT_FOUND cases
    name = draw(model_names) if draw(st.integers(0, 99)) < 12 else target
    version = draw(versions) if draw(st.integers(0, 99)) < 6 else draw(st.sampled_from(["", "1"]))
    batch = draw(st.one_of(st.integers(0, 4), st.just(cfg["max_batch"]), st.integers(1, cfg["max_batch"])))
    typed = draw(st.booleans()) if target == "tiny" else False  # mixed's FP16 input travels raw only
    inputs: list[Tensor] = []
    raw: list[bytes] = []
    for i, (in_name, datatype, dims) in enumerate(cfg["inputs"]):
        shape = [batch, *dims]
        if bad("datatype", i):
            datatype = draw(odd_datatypes)
        if bad("dim", i):
            shape[draw(st.integers(0, len(shape) - 1))] = draw(odd_dims)
        if bad("rank", i):
            shape = draw(st.one_of(st.just(shape[:-1]), st.just([*shape, 1]), st.lists(odd_dims, max_size=4)))
        if bad("input_name", i):
            in_name = draw(st.one_of(st.sampled_from(["x", "ids", "scale", "y", "", "X"]), st.text(max_size=4)))
        tensor = Tensor(name=in_name, datatype=datatype, shape=shape)
        # the element count a huge declared shape would need is never sent: small data instead
        count = math.prod(shape) if shape and all(0 <= d <= 4096 for d in shape) else draw(st.integers(0, 32))
        nbytes = count * ITEMSIZE.get(datatype, 4)
        if bad("byte_count", i):
            nbytes = max(0, nbytes + draw(st.sampled_from([-1, 1, -4, 4, -nbytes, 64])))
        raw.append(_raw_data(draw, datatype, nbytes))
        if typed or bad("typed_field", i) or bad("typed_count", i) or bad("typed_and_raw", i):
            field_name = TYPED_FIELD.get(datatype, "fp32_contents")
            if bad("typed_field", i):
                field_name = draw(st.sampled_from(FIELDS))
            n = count + (draw(st.sampled_from([-count, -1, 1, 16])) if bad("typed_count", i) else 0)
            values = _typed_values(draw, field_name, max(0, min(n, 4096)))
            tensor.contents.CopyFrom(Contents(**{field_name: values}))
        if bad("input_params", i):
            for key, value in draw(params).items():
                tensor.parameters[key].CopyFrom(value)
        inputs.append(tensor)
        if bad("extra_input", i):  # the same input twice, or one of another model
            inputs.append(Tensor(name=draw(st.sampled_from(["x", "ids", "scale", "z"])), datatype=datatype,
                                 shape=shape))
            raw.append(raw[-1])
    if bad("permute"):
        inputs = draw(st.permutations(inputs))  # raw keeps its order: data now belongs to other inputs
    if bad("drop_input"):
        del inputs[draw(st.integers(0, len(inputs) - 1))]
    if bad("raw_entries"):
        raw = draw(st.sampled_from([[], raw[:-1], [*raw, b"\0" * 64]]))
    elif typed or "typed_field" in faults or "typed_count" in faults:
        raw = []
    outputs = draw(st.lists(st.sampled_from(cfg["outputs"]), unique=True)) if draw(st.booleans()) else []
    request_outputs = [Output(name=n) for n in outputs]
    if bad("output_name"):
        request_outputs.append(Output(name=draw(st.sampled_from(["y", "sum", "scaled", "", "x", "nope"]))))
    if bad("output_params") and request_outputs:
        for key, value in draw(params).items():
            request_outputs[0].parameters[key].CopyFrom(value)
    request = Request(model_name=name, model_version=version, id=draw(st.text(max_size=4)), inputs=inputs,
                      outputs=request_outputs, raw_input_contents=raw)
    if draw(st.booleans()):  # request-level parameters carry no meaning for us and must be ignored
        for key, value in draw(params).items():
            request.parameters[key].CopyFrom(value)
    return request


# ---------------------------------------------------------------------------------- oracle
def expected_status(request: Request) -> grpc.StatusCode:
    """What the documented rules say `request` gets (written independently of service/frontend/codec.py)."""
    cfg = MODELS.get(request.model_name)
    if cfg is None or request.model_version not in ("", "1"):
        return grpc.StatusCode.NOT_FOUND
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    names = [t.name for t in request.inputs]
    specs = {n: (dt, dims) for n, dt, dims in cfg["inputs"]}
    if sorted(names) != sorted(specs) or any("shared_memory_region" in t.parameters for t in request.inputs):
        return invalid
    out_names = [o.name for o in request.outputs]
    if (len(set(out_names)) != len(out_names) or not set(out_names) <= set(cfg["outputs"])
            or any({"shared_memory_region", "classification"} & set(o.parameters) for o in request.outputs)):
        return invalid
    raw = list(request.raw_input_contents)
    if raw and (len(raw) != len(request.inputs) or any(t.HasField("contents") for t in request.inputs)):
        return invalid
    batches = set()
    for i, tensor in enumerate(request.inputs):
        datatype, dims = specs[tensor.name]
        shape = list(tensor.shape)
        if tensor.datatype != datatype or shape[1:] != list(dims) or len(shape) != len(dims) + 1:
            return invalid
        if not 0 <= shape[0] <= cfg["max_batch"]:
            return invalid
        batches.add(shape[0])
        count = math.prod(shape)
        if raw:
            if len(raw[i]) != count * ITEMSIZE[datatype]:
                return invalid
        elif datatype == "FP16":
            if tensor.HasField("contents") or count:
                return invalid
        else:
            field_name = TYPED_FIELD[datatype]
            lengths = {f: len(getattr(tensor.contents, f)) for f in FIELDS}
            if lengths[field_name] != count or any(n for f, n in lengths.items() if f != field_name):
                return invalid
    return invalid if len(batches) > 1 else grpc.StatusCode.OK


def input_arrays(request: Request) -> dict[str, np.ndarray]:
    """The inputs of a valid request as numpy arrays, decoded on the client side."""
    raw = list(request.raw_input_contents)
    arrays = {}
    for i, tensor in enumerate(request.inputs):
        dtype = NUMPY[tensor.datatype]
        if raw:
            data = np.frombuffer(raw[i], dtype)
        else:
            values = getattr(tensor.contents, TYPED_FIELD.get(tensor.datatype, "fp32_contents"))
            data = np.array(values, dtype)
        arrays[tensor.name] = data.reshape(tuple(tensor.shape))
    return arrays


def check_outputs(request: Request, response: service_pb2.ModelInferResponse, repo) -> None:
    cfg = MODELS[request.model_name]
    with np.errstate(all="ignore"):  # random bits: NaN, inf and overflow are expected, and compared
        expected = reference_outputs(request.model_name, repo / request.model_name / "1" / "model.onnx",
                                     input_arrays(request))
    wanted = [o.name for o in request.outputs] or cfg["outputs"]
    assert sorted(o.name for o in response.outputs) == sorted(wanted)
    assert response.id == request.id and response.model_name == request.model_name
    assert len(response.raw_output_contents) == len(response.outputs)
    for out, data in zip(response.outputs, response.raw_output_contents):
        want = expected[out.name]
        assert tuple(out.shape) == want.shape, (out.name, list(out.shape), want.shape)
        got = np.frombuffer(data, want.dtype).reshape(want.shape)
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=out.name)
        else:
            np.testing.assert_array_equal(got, want, err_msg=out.name)


# ---------------------------------------------------------------------------------- the run
@dataclass
class Tally:
    statuses: collections.Counter = field(default_factory=collections.Counter)
    messages: collections.Counter = field(default_factory=collections.Counter)


def _rss(server: ServerProcess) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


@pytest.fixture(scope="module")
def live(example_repo):
    with start(example_repo, ["--model-control-mode", "explicit", "--load-model", "tiny",
                              "--load-model", "mixed"]) as server, grpc.insecure_channel(server.url) as channel:
        yield server, service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_oracle_agrees_with_hand_written_cases():
    """The oracle itself can fail: a few requests whose answer is known."""
    good = Request(model_name="tiny", inputs=[Tensor(name="x", datatype="FP32", shape=[2, 16])],
                   raw_input_contents=[b"\0" * 128])
    assert expected_status(good) == grpc.StatusCode.OK
    good.raw_input_contents[0] = b"\0" * 127
    assert expected_status(good) == grpc.StatusCode.INVALID_ARGUMENT
    assert expected_status(Request(model_name="..")) == grpc.StatusCode.NOT_FOUND
    huge = Request(model_name="tiny", inputs=[Tensor(name="x", datatype="FP32", shape=[2**62, 16])],
                   raw_input_contents=[b"\0" * 64])
    assert expected_status(huge) == grpc.StatusCode.INVALID_ARGUMENT


def test_fuzzed_requests_get_documented_answers(live, example_repo):
    server, stub = live
    pids = {server.proc.pid, *(p.pid for p in server.workers())}
    assert len(pids) >= 3, "the server and the workers of tiny and mixed"
    log_start = len(server.lines)
    tally = Tally()
    # warm up both models so the RSS baseline includes the first-request allocations
    for model, data in (("tiny", [b"\0" * 64 * 256]), ("mixed", [b"\0" * 64 * 32, b"\0" * 8 * 32])):
        tensors = [Tensor(name=n, datatype=dt, shape=[MODELS[model]["max_batch"], *dims])
                   for n, dt, dims in MODELS[model]["inputs"]]
        stub.ModelInfer(Request(model_name=model, inputs=tensors, raw_input_contents=data), timeout=TIMEOUT_S)
    rss_before = _rss(server)
    workers_before = {p.pid: p.memory_info().rss for p in server.workers()}

    @settings(max_examples=EXAMPLES_RUN, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(request=infer_requests())
    def one(request: Request) -> None:
        want = expected_status(request)
        try:
            response = stub.ModelInfer(request, timeout=TIMEOUT_S)
            code, message = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            response, code, message = None, exc.code(), exc.details() or ""
        tally.statuses[code.name] += 1
        tally.messages[re.sub(r"'[^']*'|\[[^]]*\]|\d+", "_", message)[:70]] += 1
        assert code in ALLOWED, (code, message, request)
        assert code == want, f"expected {want.name}, got {code.name}: {message!r}\nrequest: {request}"
        if code == grpc.StatusCode.OK:
            check_outputs(request, response, example_repo)
        else:
            assert message.strip(), f"{code.name} without a message"

    one()
    print("fuzzer status distribution:", dict(tally.statuses), f"({len(tally.messages)} distinct messages)")
    for m, n in tally.messages.most_common(15):
        print(f"{n:5d}  {m}")
    assert sum(tally.statuses.values()) >= EXAMPLES_RUN
    for status in ("OK", "INVALID_ARGUMENT", "NOT_FOUND"):
        assert tally.statuses[status] >= EXAMPLES_RUN // 20, f"too few {status} cases: {dict(tally.statuses)}"

    assert server.proc.poll() is None
    assert {server.proc.pid, *(p.pid for p in server.workers())} == pids, "a process was replaced"
    growth = {"server": _rss(server) - rss_before,
              **{f"worker {p.pid}": p.memory_info().rss - workers_before[p.pid] for p in server.workers()}}
    print("RSS growth MiB:", {k: round(v / 2**20, 1) for k, v in growth.items()})
    assert all(v < RSS_GROWTH_LIMIT for v in growth.values()), growth
    log = "".join(server.lines[log_start:])
    assert "Traceback" not in log and "unexpected error" not in log, log
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    labels = set(re.findall(r'model="([^"]*)"', text))
    assert labels <= {"tiny", "mixed", "mlp", "convnet"}, labels
