"""The MoE teacher: its families' routing rules as data (`families`), the routing modes applied by hooks
(`routing`), the routers file SAR adapts (`routers`), capturing its distributions at the targets (`capture`),
stage one's backends behind one interface (`backends`, `vllm`), the teachers a training run learns from
(`sources`) and the routing diagnostics (`diagnostics`).

May import core, models, cache and data.
"""
