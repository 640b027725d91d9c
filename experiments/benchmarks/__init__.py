"""Step time and memory of the estimators, against peers and tangent layouts."""
