"""Where tangents enter (weights, activities): step time, memory, cosine and training."""
