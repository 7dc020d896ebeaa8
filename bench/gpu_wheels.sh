#!/usr/bin/env bash
# The gateway's Python dependencies as CPython 3.12 manylinux x86-64 wheels in .whl/, for
# a GPU host whose python has torch, triton, numpy, safetensors, sentencepiece,
# tokenizers, httpx, aiohttp, jinja2, uvloop and rich but nothing else of ours and no
# package index (the lent H200s: bench/*_gpu.sh install .whl/*.whl into /tmp/site).
# Versions are pyproject.toml's pins and their resolved dependencies; pycountry goes in
# unpacked to .whl/site without its translations (22 MB the gateway never reads), to keep
# the carried tree under the device's 64 MiB.
#   bash bench/gpu_wheels.sh            (repo root; add /.whl/ to .git/info/exclude)
set -eu
mkdir -p .whl
PLAT=""
for p in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLAT="$PLAT --platform ${p}_x86_64"
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d .whl \
  aiosqlite==0.22.1 alembic==1.20.1 annotated-doc==0.0.7 annotated-types==0.8.0 apache-tvm-ffi==0.1.15.post2 \
  argon2-cffi==25.1.0 argon2-cffi-bindings==26.2.0 cffi==2.1.1 googleapis-common-protos==1.76.0 greenlet==3.5.6 \
  httpcore2==2.16.2 httptools==0.9.0 httpx2==2.16.2 huggingface-hub==2.4.0 jiter==0.19.0 jsonschema==4.26.0 \
  jsonschema-rs==0.60.3 jsonschema-specifications==2025.9.1 mako==1.4.3 mistral-common==1.13.1 openai==3.54.0 \
  opentelemetry-api==1.45.2 opentelemetry-exporter-http-transport==0.66b2 opentelemetry-exporter-otlp-common==0.66b2 \
  opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-exporter-otlp-proto-http==1.45.2 \
  opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 orjson==3.13.0 \
  packaging==26.4 pillow==13.0.0 prometheus-client==0.26.0 protobuf==7.36.2 pycparser==3.12 pydantic==2.14.3 \
  pydantic-core==2.50.4 pydantic-extra-types==2.11.1 pyjwt==2.15.1 python-multipart==0.0.34 redis==8.1.0 \
  referencing==0.37.0 regex==2026.11.19 rpds-py==2026.9.1 sniffio==1.3.1 sqlalchemy==2.1.9 starlette==1.10.0 \
  stripe==16.1.0 tiktoken==0.14.0 tqdm==4.70.1 transformers==5.23.0 truststore==0.10.5 typing-inspection==0.4.5 \
  uvicorn==0.54.0 xgrammar==0.2.9
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$tmp" pycountry==26.2.16
rm -rf .whl/site/pycountry .whl/site/pycountry-*.dist-info && mkdir -p .whl/site
(cd .whl/site && python3 -m zipfile -e "$tmp"/pycountry-*.whl . && rm -rf pycountry/locales pycountry/tests)
rm -rf "$tmp"
du -sh .whl
