"""relex inside trainers: callbacks for frameworks that have them (TRL / transformers Trainer).

Trainers without callbacks (verl, OpenRLHF, NeMo-RL) are followed from outside by
`relex watch` (relex/analysis/watch.py).
"""
