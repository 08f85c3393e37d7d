"""Built-in kvmmu plugins: vendors (vmx, svm) and consumers (kvmgt, virtio_gpu, iommu).

Each is an entry point of the kvmmu distribution, discovered by the same
stevedore path as third-party plugins.
"""
