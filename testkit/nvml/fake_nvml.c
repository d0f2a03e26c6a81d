/*
 * A fake libnvidia-ml.so for tests. It exports the NVML C functions that `machine` calls
 * through nvml-wrapper, with NVML's real signatures and return codes, and describes GPUs taken
 * from environment variables read at nvmlInit time:
 *
 *   FAKE_NVML_GPUS        number of GPUs (default 1)
 *   FAKE_NVML_INIT_ERROR  if set, nvmlInit_v2 returns this NVML error code (e.g. 9: driver not loaded)
 *   FAKE_NVML_NAME        product name (default "NVIDIA GeForce RTX 4090")
 *   FAKE_NVML_MEMORY_MIB  total memory per GPU in MiB (default 24564)
 *   FAKE_NVML_CONTROL     a file the test appends commands to, one a line, read as they come
 *                         (each line once) by the event wait and by the health readings:
 *       xid <gpu> <code>      the next nvmlEventSetWait_v2 returns a critical XID event
 *       dbe <gpu>             ... a double-bit ECC event
 *       lost <gpu>            every later call about that GPU returns NVML_ERROR_GPU_IS_LOST
 *       throttle <gpu> <bits> nvmlDeviceGetCurrentClocksThrottleReasons returns these bits
 *       temp <gpu> <celsius>  the core temperature
 *       pending <gpu>         retired pages are pending (a reset is needed)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int nvmlReturn_t;
typedef struct fake_device *nvmlDevice_t;

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_TIMEOUT 10
#define NVML_ERROR_GPU_IS_LOST 15
#define EVENT_DOUBLE_BIT_ECC 0x2ULL
#define EVENT_XID 0x8ULL
#define MAX_GPUS 16

struct fake_device {
    unsigned int index;
    int lost;                        /* calls return GPU_IS_LOST */
    unsigned long long throttle;     /* current clocks throttle reasons */
    int temperature;                 /* < 0: the default */
    int pages_pending;
    unsigned long long registered;   /* event types registered */
};
typedef struct { nvmlDevice_t device; unsigned long long eventType, eventData; unsigned int gpuInstanceId, computeInstanceId; } nvmlEventData_t;
typedef struct fake_event_set { int unused; } *nvmlEventSet_t;

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

/* Events waiting to be delivered, oldest first. */
#define MAX_EVENTS 64
static struct { unsigned int gpu; unsigned long long type, data; } queued[MAX_EVENTS];
static unsigned int queued_count = 0;
static long control_offset = 0;
static struct fake_event_set the_set;

/* Applies the control file's lines added since the last read. */
static void sync_control(void) {
    const char *path = getenv("FAKE_NVML_CONTROL");
    if (!path || !*path) return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    if (fseek(f, control_offset, SEEK_SET) != 0) { fclose(f); return; }
    char line[256];
    while (fgets(line, sizeof line, f)) {
        size_t n = strlen(line);
        if (n == 0 || line[n - 1] != '\n') break; /* a line still being written: read it later */
        control_offset += (long)n;
        char cmd[32];
        unsigned int gpu = 0;
        unsigned long long value = 0;
        int got = sscanf(line, "%31s %u %llu", cmd, &gpu, &value);
        if (got < 2 || gpu >= gpu_count) continue;
        struct fake_device *d = &devices[gpu];
        if (strcmp(cmd, "xid") == 0 && got == 3 && queued_count < MAX_EVENTS) {
            queued[queued_count].gpu = gpu; queued[queued_count].type = EVENT_XID; queued[queued_count].data = value;
            queued_count++;
        } else if (strcmp(cmd, "dbe") == 0 && queued_count < MAX_EVENTS) {
            queued[queued_count].gpu = gpu; queued[queued_count].type = EVENT_DOUBLE_BIT_ECC; queued[queued_count].data = 0;
            queued_count++;
        } else if (strcmp(cmd, "lost") == 0) {
            d->lost = 1;
        } else if (strcmp(cmd, "throttle") == 0 && got == 3) {
            d->throttle = value;
        } else if (strcmp(cmd, "temp") == 0 && got == 3) {
            d->temperature = (int)value;
        } else if (strcmp(cmd, "pending") == 0) {
            d->pages_pending = 1;
        }
    }
    fclose(f);
}

/* The return code of a call about `device`: lost GPUs answer nothing else. */
static int check(nvmlDevice_t device) {
    if (!valid(device)) return NVML_ERROR_INVALID_ARGUMENT;
    sync_control();
    return device->lost ? NVML_ERROR_GPU_IS_LOST : NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) {
    const char *err = getenv("FAKE_NVML_INIT_ERROR");
    if (err && *err) return atoi(err);
    const char *n = getenv("FAKE_NVML_GPUS");
    gpu_count = n ? (unsigned int)atoi(n) : 1;
    if (gpu_count > MAX_GPUS) gpu_count = MAX_GPUS;
    for (unsigned int i = 0; i < gpu_count; i++) {
        memset(&devices[i], 0, sizeof devices[i]);
        devices[i].index = i;
        devices[i].temperature = -1;
    }
    queued_count = 0;
    control_offset = 0;
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
    case 3: return "Not Supported";
    case 10: return "Timeout";
    case 12: return "NVML Shared Library Not Found";
    case 15: return "GPU is lost";
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
    int r = check(device);
    if (r != NVML_SUCCESS) return r;
    if (!temp || sensor != 0) return NVML_ERROR_INVALID_ARGUMENT;
    *temp = device->temperature >= 0 ? (unsigned int)device->temperature : 40 + device->index;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device, unsigned long long *reasons) {
    int r = check(device);
    if (r != NVML_SUCCESS) return r;
    if (!reasons) return NVML_ERROR_INVALID_ARGUMENT;
    *reasons = device->throttle;
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device, unsigned long long *reasons) {
    return nvmlDeviceGetCurrentClocksThrottleReasons(device, reasons);
}

nvmlReturn_t nvmlDeviceGetRetiredPagesPendingStatus(nvmlDevice_t device, int *pending) {
    int r = check(device);
    if (r != NVML_SUCCESS) return r;
    if (!pending) return NVML_ERROR_INVALID_ARGUMENT;
    *pending = device->pages_pending;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (!set) return NVML_ERROR_INVALID_ARGUMENT;
    *set = &the_set;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
    (void)set;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *types) {
    int r = check(device);
    if (r != NVML_SUCCESS) return r;
    if (!types) return NVML_ERROR_INVALID_ARGUMENT;
    *types = EVENT_XID | EVENT_DOUBLE_BIT_ECC;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long types, nvmlEventSet_t set) {
    int r = check(device);
    if (r != NVML_SUCCESS) return r;
    if (set != &the_set) return NVML_ERROR_INVALID_ARGUMENT;
    if (types & ~(EVENT_XID | EVENT_DOUBLE_BIT_ECC)) return NVML_ERROR_NOT_SUPPORTED;
    device->registered |= types;
    return NVML_SUCCESS;
}

/* Delivers the oldest queued event a device registered for, waiting up to timeoutms for one
 * (the control file is read every 20 ms meanwhile). */
nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms) {
    if (!initialized) return NVML_ERROR_UNINITIALIZED;
    if (set != &the_set || !data) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned int waited = 0;
    for (;;) {
        sync_control();
        for (unsigned int i = 0; i < queued_count; i++) {
            struct fake_device *d = &devices[queued[i].gpu];
            if (!(d->registered & queued[i].type)) continue;
            memset(data, 0, sizeof *data);
            data->device = d;
            data->eventType = queued[i].type;
            data->eventData = queued[i].data;
            memmove(&queued[i], &queued[i + 1], (queued_count - i - 1) * sizeof queued[0]);
            queued_count--;
            return NVML_SUCCESS;
        }
        if (waited >= timeoutms) return NVML_ERROR_TIMEOUT;
        struct timespec slice = {0, 20 * 1000 * 1000};
        nanosleep(&slice, NULL);
        waited += 20;
    }
}
nvmlReturn_t nvmlEventSetWait(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms) {
    return nvmlEventSetWait_v2(set, data, timeoutms);
}
