"""kernels/ is a plain directory: `import kernels` can never reach our code, model loading never imports it, and an
installed Hugging Face `kernels` distribution is neither shadowed nor shadowing. Our kernels import as
`ptqsuite_kernels`."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json, sys, torch
from transformers import AutoModelForCausalLM
from ptqsuite.paths import ASSETS
model = AutoModelForCausalLM.from_pretrained(ASSETS / "models" / "stories260K")
spec = importlib.util.find_spec("kernels")
import ptqsuite_kernels
out = {
    "logits": model(torch.arange(16).unsqueeze(0)).logits.sum().item(),
    "kernels_origin": None if spec is None else spec.origin,
    "kernels_imported": "kernels" in sys.modules and getattr(sys.modules["kernels"], "__file__", None),
    "ptqsuite_kernels": ptqsuite_kernels.__file__,
}
print(json.dumps(out))
"""


def probe(*path_first: Path) -> dict:
    code = "import sys; sys.path[:0] = %r\n" % [str(p) for p in path_first] + PROBE
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loading_a_model_with_the_repository_root_on_sys_path():
    with_root, without = probe(ROOT), probe()
    assert with_root["logits"] == without["logits"]
    assert with_root["kernels_origin"] in (None, "namespace")  # at most an empty namespace portion
    assert not with_root["kernels_imported"]
    assert Path(with_root["ptqsuite_kernels"]).is_relative_to(ROOT / "kernels")
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_an_installed_kernels_package_is_not_shadowed(tmp_path):
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "__init__.py").write_text("")  # no __version__: transformers then treats it as unusable, not broken
    code = f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(tmp_path)!r}]; import kernels; print(kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(fake / "__init__.py")
