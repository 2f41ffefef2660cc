# trtserve developer commands. `make serve` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTO_OUT := service/proto
PROTO_GEN := $(PROTO_OUT)/inference_pb2.py $(PROTO_OUT)/inference_pb2_grpc.py $(PROTO_OUT)/model_config_pb2.py
MODELS := examples/models
MODEL_STAMP := $(MODELS)/.generated
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002

.PHONY: install protos models serve test test-gpu bench lint clean

install: $(STAMP) $(PROTO_GEN)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,tensorrt]'
	touch $(STAMP)

protos: $(PROTO_GEN)

# Generated code is never edited by hand: the sed turns protoc's absolute imports into package-relative
# ones, registers the files in trtserve's private descriptor pool (see service/proto/_pool.py) and names
# the modules by their import path so that messages pickle.
$(PROTO_GEN) &: protos/inference.proto protos/model_config.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
		--pyi_out=$(PROTO_OUT) protos/inference.proto protos/model_config.proto
	sed -i -E -e 's/^import (\w+_pb2) as/from . import \1 as/' \
		-e 's/_descriptor_pool\.Default\(\)/_POOL/' \
		-e "s/(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')(\w+)'/\1service.proto.\2'/" \
		-e 's/^(from google.protobuf.internal import builder as _builder)$$/\1\nfrom ._pool import POOL as _POOL/' \
		$(PROTO_OUT)/*_pb2*.py

models: $(MODEL_STAMP)

$(MODEL_STAMP): examples/generate_models.py install
	$(PY) examples/generate_models.py --out $(MODELS)
	touch $(MODEL_STAMP)

serve: install models
	$(VENV)/bin/trtserve serve --model-repository $(MODELS) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

test: install models
	$(PY) -m pytest -q -m "not gpu"

test-gpu: install models
	$(PY) -m pytest -q -m gpu

bench: install models
	$(PY) -m bench.run

lint: install
	$(VENV)/bin/ruff check service tests bench examples

clean:
	rm -rf $(VENV) $(PROTO_OUT)/*_pb2*.py $(PROTO_OUT)/*_pb2.pyi $(MODEL_STAMP)
