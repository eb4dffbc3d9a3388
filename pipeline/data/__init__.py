"""What training and evaluation read: instruction records (`records`), prompt templates (`template`), the
prepared format (`prepared`), the teacher's typed signal at a batch's targets (`signals`), batches (`batch`) and
the reader that streams a cache's or prepared data's shards into them (`reader`).

May import core, models and cache.
"""
