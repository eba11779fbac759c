"""Checks a built alterops wheel and gives it its manylinux tag.

    python tools/check_wheel.py dist/alterops-*.whl

- the tag is ``py3-none-<platform>`` (no shared object uses the Python C API);
- it holds the bindings, the three CPU kernel levels, LICENSE and the docs; every shared object
  is stripped and uses no Python C API symbol;
- ``auditwheel repair`` (torch's own libraries excluded: they come from the torch the user
  installed) retags it ``manylinux_2_X_x86_64`` for the oldest glibc its symbols allow, and the
  linux-tagged original is replaced. Prints the size and tag.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

EXCLUDE = ["libtorch_cpu.so", "libtorch_cuda.so", "libtorch.so", "libc10.so", "libc10_cuda.so",
           "libcudart.so.*", "libtorch_python.so"]
REQUIRED = ["alterops/_lib/libalterops_cpu.so", "alterops/_lib/libalterops_kernels_generic.so",
            "alterops/_lib/libalterops_kernels_avx2.so", "alterops/_lib/libalterops_kernels_avx512.so",
            "alterops/docs/semantics.md"]


def check(path: str) -> None:
    name = os.path.basename(path)
    m = re.match(r"alterops-[^-]+-py3-none-(.+)\.whl$", name)
    assert m, f"{name}: expected a py3-none-<platform> wheel"
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        for req in REQUIRED:
            assert req in names, f"{name} lacks {req}"
        assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), \
            f"{name} lacks LICENSE"
        with tempfile.TemporaryDirectory() as tmp:
            for n in names:
                if n.endswith(".so"):
                    z.extract(n, tmp)
                    so = os.path.join(tmp, n)
                    sections = subprocess.run(["readelf", "-S", so], capture_output=True, text=True).stdout
                    assert ".debug_info" not in sections and ".symtab" not in sections, f"{n} is not stripped"
                    undefined = subprocess.run(["nm", "-D", "--undefined-only", so], capture_output=True,
                                               text=True).stdout
                    py = [s for s in undefined.split() if s.startswith("Py") or s.startswith("_Py")]
                    assert not py, f"{n} uses the Python C API: {py[:5]}"


def main(argv: list[str]) -> int:
    wheels = [w for a in argv for w in glob.glob(a)]
    assert wheels, "no wheel given"
    for wheel in wheels:
        check(wheel)
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "auditwheel", "repair", "--only-plat", "-w", out, wheel]
            for pattern in EXCLUDE:
                cmd += ["--exclude", pattern]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            repaired = glob.glob(os.path.join(out, "*.whl"))
            if proc.returncode == 0 and repaired:
                final = os.path.join(os.path.dirname(wheel), os.path.basename(repaired[0]))
                shutil.move(repaired[0], final)
                if os.path.abspath(final) != os.path.abspath(wheel):
                    os.remove(wheel)
                check(final)
                wheel = final
            else:
                print(f"auditwheel could not give {os.path.basename(wheel)} a manylinux tag:\n{proc.stderr[-3000:]}")
        print(f"wheel: {os.path.basename(wheel)}  {os.path.getsize(wheel) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
