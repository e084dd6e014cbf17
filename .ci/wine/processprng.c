/* bcryptprimitives.dll for Wine 8: exports ProcessPrng, which Rust's std on Windows imports and
 * Debian's Wine 8 lacks (every Rust .exe otherwise fails to start with status c0000135).
 * Built by .ci/wine/setup with x86_64-w64-mingw32-gcc; CI-only, never shipped. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length); /* RtlGenRandom, advapi32 */

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x7fffffff ? 0x7fffffff : (ULONG)len;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
