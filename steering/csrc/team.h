/* This thread's place in the calling thread's OpenMP team (0 of 1 without OpenMP). The kernels run
 * on that team: torch's own runtime (libgomp.so.1, already loaded), whose threads torch keeps warm. */
#ifndef TINYMORPH_TEAM_H
#define TINYMORPH_TEAM_H
#ifdef _OPENMP
#include <omp.h>
#endif

static inline int team_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

#endif
