"""Training: float training and QAT of one model or many side by side
(:mod:`~qevo.train.trainer`), the float model a method starts from
(:mod:`~qevo.train.pretrained`), and ``python -m qevo.train`` (:mod:`~qevo.train.method`)."""
