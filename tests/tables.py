"""A synthetic table shaped like UCI German credit (20 attributes, 1,000 rows, mixed types).

Nothing is downloaded: the values are drawn from a seeded generator, with the real table's column
names, types and category codes (A11..A14 and so on), and a good/bad label that depends on a few
columns, so a model has something to learn.
"""

import pathlib

import numpy as np

NUMERIC = (
  "duration",
  "credit_amount",
  "installment_rate",
  "residence_since",
  "age",
  "existing_credits",
  "num_dependents",
)
CATEGORICAL = {  # column -> its codes in the UCI file
  "checking_status": ("A11", "A12", "A13", "A14"),
  "credit_history": ("A30", "A31", "A32", "A33", "A34"),
  "purpose": ("A40", "A41", "A42", "A43", "A44", "A45", "A46", "A48", "A49", "A410"),
  "savings": ("A61", "A62", "A63", "A64", "A65"),
  "employment": ("A71", "A72", "A73", "A74", "A75"),
  "personal_status": ("A91", "A92", "A93", "A94"),
  "other_debtors": ("A101", "A102", "A103"),
  "property": ("A121", "A122", "A123", "A124"),
  "other_installment_plans": ("A141", "A142", "A143"),
  "housing": ("A151", "A152", "A153"),
  "job": ("A171", "A172", "A173", "A174"),
  "telephone": ("A191", "A192"),
  "foreign_worker": ("A201", "A202"),
}
LABEL = "class"
# The schema a user writes first: only the label and the private columns.
SCHEMA = {"label": LABEL, "private_categorical": ["personal_status", "housing"]}


def german_like(
  path: pathlib.Path, *, num_rows: int = 1000, seed: int = 0, id_column: bool = False
) -> pathlib.Path:
  """Writes the table to `path` (CSV with a header); `id_column` adds a unique `application_id`."""
  rng = np.random.default_rng(seed)
  cols = {}
  if id_column:
    cols["application_id"] = np.array([f"APP{i:05d}" for i in range(num_rows)])
  cols["checking_status"] = rng.choice(CATEGORICAL["checking_status"], num_rows)
  cols["duration"] = rng.integers(4, 72, num_rows)
  for name in ("credit_history", "purpose"):
    cols[name] = rng.choice(CATEGORICAL[name], num_rows)
  cols["credit_amount"] = rng.integers(250, 18_500, num_rows)
  for name in ("savings", "employment"):
    cols[name] = rng.choice(CATEGORICAL[name], num_rows)
  cols["installment_rate"] = rng.integers(1, 5, num_rows)
  for name in ("personal_status", "other_debtors"):
    cols[name] = rng.choice(CATEGORICAL[name], num_rows)
  cols["residence_since"] = rng.integers(1, 5, num_rows)
  cols["property"] = rng.choice(CATEGORICAL["property"], num_rows)
  cols["age"] = rng.integers(19, 76, num_rows)
  for name in ("other_installment_plans", "housing"):
    cols[name] = rng.choice(CATEGORICAL[name], num_rows)
  cols["existing_credits"] = rng.integers(1, 5, num_rows)
  cols["job"] = rng.choice(CATEGORICAL["job"], num_rows)
  cols["num_dependents"] = rng.integers(1, 3, num_rows)
  for name in ("telephone", "foreign_worker"):
    cols[name] = rng.choice(CATEGORICAL[name], num_rows)
  logit = (
    1.5 * (cols["checking_status"] == "A14")
    - 0.03 * (cols["duration"] - 20)
    + 0.8 * (cols["housing"] == "A152")
    - 0.6 * (cols["personal_status"] == "A92")
  )
  good = rng.random(num_rows) < 1 / (1 + np.exp(-logit))
  cols[LABEL] = np.where(good, "good", "bad")
  lines = [",".join(cols)] + [",".join(str(v[i]) for v in cols.values()) for i in range(num_rows)]
  path.write_text("\n".join(lines) + "\n")
  return path
