# Mimics amdsmi 7.0.2 imported without ROCm: two lines on stdout, then a plain KeyError.
print("Unable to find libamd_smi.so")
print("Please check ROCm installation")
raise KeyError("libamd_smi.so")
