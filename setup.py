"""Only the package list lives here; everything else is in pyproject.toml.

setuptools finds dagc's packages (a new sub-package ships without anyone listing it); the
Jinja2 templates live in templates/ and ship as ``dagc._templates`` (pyproject.toml's
package-dir), a mapped folder that a find directive in pyproject.toml cannot add.
"""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["dagc", "dagc.*"]) + ["dagc._templates"])
