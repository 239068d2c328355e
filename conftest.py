"""pytest setup for the whole repo: one intra-op thread, since the tests run many tiny CPU ops."""
import torch


def pytest_configure(config):
    torch.set_num_threads(1)
