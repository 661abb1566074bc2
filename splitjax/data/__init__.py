"""Tabular data for split learning: bundled UCI tables, Taobao, any CSV, a synthetic generator."""

from splitjax.data.base import DataError
from splitjax.data.base import Roles
from splitjax.data.base import Split
from splitjax.data.base import TabularData
from splitjax.data.datasets import DATASETS
from splitjax.data.datasets import DEFAULT_ROLES
from splitjax.data.datasets import load
from splitjax.data.datasets import read_schema
from splitjax.data.generator import synthetic
