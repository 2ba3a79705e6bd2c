"""Imported only by the DataLoader fork server, as its last preload
(``training.loader_workers.FORKSERVER_PRELOAD``): the fork server then ends when the
training process that started it does, ``kill -9`` included. Nothing else imports it."""

import os

from training.loader_workers import exit_with

exit_with(os.getppid())    # the fork server's parent: the training process
