"""The embedded default's scaffolding: its material (`material`: SmolLM2 from PyPI, the generated task suite of
`tasks`, `domains` and `vocabulary`) and the models it makes: an MoE teacher upcycled from a dense model
(`upcycle`) or mixed from dense branches (`mixture`), a student cut from the source (`student_init`), and the
refits they share (`fitting`).

Stands beside teacher: may import core and models only.
"""
