"""The LM worker: ``ImageInsertEmbedding``, the decoder, scheduling and its HTTP API."""

from lm_worker.image_insert_embedding import ImageForInsert, ImageInsertEmbedding

__all__ = ["ImageForInsert", "ImageInsertEmbedding"]
