"""The command line starts light: `import vlmkit` and the commands that need no model import
neither torch nor transformers (`vlmkit --help` in a fraction of a second), while the model
classes still load, and register with transformers' Auto factories, when asked for."""

import json
import subprocess
import sys

HEAVY = ("torch", "transformers")


def loaded_after(code: str) -> dict:
    probe = f"import sys\n{code}\nimport json\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    return json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                     check=True).stdout.splitlines()[-1])


def test_import_vlmkit_and_the_cli_parser_stay_light():
    assert loaded_after("import vlmkit") == {"torch": False, "transformers": False}
    assert loaded_after("from vlmkit.cli import build_parser; build_parser()") == {"torch": False,
                                                                                   "transformers": False}
    assert loaded_after("import vlmkit.data.pdf") == {"torch": False, "transformers": False}


def test_the_classes_load_and_register_when_asked_for():
    code = ("import vlmkit\nfrom transformers import AutoConfig\n"
            "assert type(vlmkit.VLMConfig()).__name__ == 'VLMConfig'\n"
            "assert AutoConfig.for_model('vlmkit').__class__.__name__ == 'VLMConfig'")
    assert loaded_after(code)["transformers"]
