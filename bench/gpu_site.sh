# Sourced by the GPU run scripts (bench/transitions_gpu.sh, issue16_gpu.sh, delivery_ab.sh)
# from the repository root on the GPU host: the gateway's wheels (.whl, made by
# bench/gpu_wheels.sh) installed into /tmp/site beside the host's torch and triton, and
# this checkout made importable with pyproject.toml's entry points (the plugins, `sluice`).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
[ -d .whl/site ] && cp -r .whl/site/. /tmp/site/  # unpacked extras (pycountry without its translations)
python3 - <<'PY' || { echo "entry points failed"; exit 1; }
import pathlib, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
info = pathlib.Path("/tmp/site/sluice-0.1.0.dist-info")
info.mkdir(parents=True, exist_ok=True)
(info / "METADATA").write_text("Metadata-Version: 2.1\nName: sluice\nVersion: 0.1.0\n")
groups = {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}
(info / "entry_points.txt").write_text("".join(
    f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in names.items()) + "\n"
    for group, names in groups.items()))
PY
export PYTHONPATH=/tmp/site:$PWD
