"""The teacher-logit cache: its typed identity and shard encoding (`identity`), the shards (`shards`), the
manifest and the commit protocol (`manifest`, `records`), the checks of a committed shard (`checks`), and where a
cache lives (`storage`: a directory or an object store).

May import core and models.
"""
