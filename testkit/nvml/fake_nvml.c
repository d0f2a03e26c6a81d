/*
 * A fake libnvidia-ml.so for tests. It exports the NVML C functions that `machine` calls
 * through nvml-wrapper, with NVML's real signatures and return codes, and describes GPUs taken
 * from environment variables read at nvmlInit time:
 *
 *   FAKE_NVML_GPUS        number of GPUs (default 1)
 *   FAKE_NVML_INIT_ERROR  if set, nvmlInit_v2 returns this NVML error code (e.g. 9: driver not loaded)
 *   FAKE_NVML_NAME        product name (default "NVIDIA GeForce RTX 4090")
 *   FAKE_NVML_MEMORY_MIB  total memory per GPU in MiB (default 24564)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
typedef struct fake_device *nvmlDevice_t;

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define MAX_GPUS 16

struct fake_device { unsigned int index; };

typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;

static struct fake_device devices[MAX_GPUS];
static unsigned int gpu_count = 0;
static int initialized = 0;

static unsigned long long memory_bytes(void) {
    const char *mib = getenv("FAKE_NVML_MEMORY_MIB");
    return (mib ? strtoull(mib, NULL, 10) : 24564ULL) * 1024ULL * 1024ULL;
}

static int copy_out(const char *value, char *out, unsigned int length) {
    if (out == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(value) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(out, value);
    return NVML_SUCCESS;
}

static int valid(nvmlDevice_t device) {
    return initialized && device != NULL && device >= devices && device < devices + gpu_count;
}

nvmlReturn_t nvmlInit_v2(void) {
    const char *err = getenv("FAKE_NVML_INIT_ERROR");
    if (err && *err) return atoi(err);
    const char *n = getenv("FAKE_NVML_GPUS");
    gpu_count = n ? (unsigned int)atoi(n) : 1;
    if (gpu_count > MAX_GPUS) gpu_count = MAX_GPUS;
    for (unsigned int i = 0; i < gpu_count; i++) devices[i].index = i;
    initialized = 1;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { (void)flags; return nvmlInit_v2(); }
nvmlReturn_t nvmlInit(void) { return nvmlInit_v2(); }

nvmlReturn_t nvmlShutdown(void) { initialized = 0; return NVML_SUCCESS; }

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case 0: return "Success";
    case 9: return "Driver Not Loaded";
    case 12: return "NVML Shared Library Not Found";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    return copy_out("550.54.15", version, length);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *version) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (!version) return NVML_ERROR_INVALID_ARGUMENT;
    *version = 12040;
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *version) { return nvmlSystemGetCudaDriverVersion_v2(version); }

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = gpu_count;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (index >= gpu_count || !device) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &devices[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    if (!valid(device) || !index) return NVML_ERROR_INVALID_ARGUMENT;
    *index = device->index;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    const char *configured = getenv("FAKE_NVML_NAME");
    return copy_out(configured ? configured : "NVIDIA GeForce RTX 4090", name, length);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    char value[96];
    snprintf(value, sizeof value, "GPU-fa4e0000-0000-4000-8000-%012u", device->index);
    return copy_out(value, uuid, length);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    if (!valid(device) || !memory) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long total = memory_bytes();
    memory->total = total;
    memory->reserved = 0;
    memory->used = (unsigned long long)(device->index + 1) * 256ULL * 1024ULL * 1024ULL;
    memory->free = total - memory->used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    if (!valid(device) || !memory) return NVML_ERROR_INVALID_ARGUMENT;
    nvmlMemory_v2_t v2;
    nvmlDeviceGetMemoryInfo_v2(device, &v2);
    memory->total = v2.total;
    memory->free = v2.free;
    memory->used = v2.used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization) {
    if (!valid(device) || !utilization) return NVML_ERROR_INVALID_ARGUMENT;
    utilization->gpu = 10 * (device->index + 1) % 100;
    utilization->memory = 5 * (device->index + 1) % 100;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensor, unsigned int *temp) {
    if (!valid(device) || !temp || sensor != 0) return NVML_ERROR_INVALID_ARGUMENT;
    *temp = 40 + device->index;
    return NVML_SUCCESS;
}
