"""Loss-spike bisecting: replay the exact batches, name the documents, exclude them."""
