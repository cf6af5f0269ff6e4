"""Every citation of the design document points at a section it has."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_design_citations_resolve():
    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "docs/design.md").read_text(), re.M))
    cited = {}
    for path in [ROOT / "README.md", *ROOT.glob("[a-z]*/**/*.py")]:
        if ".venv" in path.parts:
            continue
        for number in re.findall(r"docs/design\.md section (\d+)", path.read_text()):
            cited.setdefault(number, []).append(path.name)
    assert cited, "the design document is cited nowhere"
    missing = {n: files for n, files in cited.items() if n not in sections}
    assert not missing, f"citations of sections the design document lacks: {missing}"
