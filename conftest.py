"""pytest setup for the whole repo: one intra-op thread (the tests run many tiny CPU ops); triton imported first
under its interpreter when there is no GPU."""
import torch


def pytest_configure(config):
    torch.set_num_threads(1)
    # Triton decorates its own library functions (tl.sum's combine, ...) when first imported, reading
    # TRITON_INTERPRET then. Without a GPU the kernel tests run under the interpreter, so triton must be imported
    # with it on before anything else imports it (transformers does, through torch, at test collection).
    from seqmix_kernels.testing import import_kernel_modules

    import_kernel_modules("triton.language")
