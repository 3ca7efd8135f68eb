"""The test suite, a package: its helpers import as ``tests.factories`` and so on."""

from pathlib import Path

# Code for a child ``python -c`` that makes these helpers importable (``from tests.factories
# import ...``) without putting the checkout's root on sys.path, where its top-level folders
# would shadow PyPI packages of the same names (tests/test_import_path.py).
_TESTS = Path(__file__).resolve().parent
TESTS_PACKAGE = (
    "import importlib.util as _u, sys as _s\n"
    f"_spec = _u.spec_from_file_location('tests', {str(_TESTS / '__init__.py')!r}, "
    f"submodule_search_locations=[{str(_TESTS)!r}])\n"
    "_s.modules['tests'] = _u.module_from_spec(_spec)\n"
    "_spec.loader.exec_module(_s.modules['tests'])\n")
