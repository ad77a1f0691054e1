// The HTML report's script, inlined into the page at render time (parity/report/html.py).
// Filtering and sorting 600+ rows by hand is the main thing a reader does with the table; the copy
// button saves retyping the repro; the charts are drawn from the data the page carries.
(function(){
var t=document.querySelector('table.rec');
if(t){var tb=t.tBodies[0],ths=t.tHead.rows[0].cells,all=Array.prototype.slice.call(tb.rows);
for(var k=0;k<all.length;k++)all[k]._i=k;
function key(td,num){var v=td.getAttribute('data-v');if(v===null)v=td.textContent.trim();
if(!num)return v.toLowerCase();if(v==='inf'||v==='nan')return Infinity;if(v==='-inf')return -Infinity;
var x=parseFloat(v);return isNaN(x)?null:x;}
function sortBy(i){var th=ths[i],num=th.getAttribute('data-t')==='n',cur=th.getAttribute('aria-sort');
var dir=cur?(cur==='descending'?1:-1):(th.getAttribute('data-d')==='a'||!num?1:-1);
for(var j=0;j<ths.length;j++)ths[j].removeAttribute('aria-sort');
th.setAttribute('aria-sort',dir<0?'descending':'ascending');
var rows=Array.prototype.slice.call(tb.rows).map(function(r){return [key(r.cells[i],num),r];});
rows.sort(function(a,b){var x=a[0],y=b[0];
if(x===null||y===null){if(x===y)return a[1]._i-b[1]._i;return x===null?1:-1;}
if(x<y)return -dir;if(x>y)return dir;return a[1]._i-b[1]._i;});
for(var n=0;n<rows.length;n++)tb.appendChild(rows[n][1]);}
for(var i=0;i<ths.length;i++)ths[i].addEventListener('click',sortBy.bind(null,i));
var q=document.getElementById('flt'),b=document.getElementById('fonly');
function f(){var s=q.value.toLowerCase(),o=b.checked;for(var i=0;i<all.length;i++){var r=all[i];
var d=(r.getAttribute('data-s')||'').toLowerCase();
r.style.display=((!s||d.indexOf(s)>=0)&&(!o||r.classList.contains('bad')))?'':'none';}}
q.addEventListener('input',f);b.addEventListener('change',f);
function reveal(){var r=location.hash&&document.getElementById(location.hash.slice(1));
if(r&&r.parentNode===tb&&r.style.display==='none'){q.value='';b.checked=false;f();r.scrollIntoView();}}
window.addEventListener('hashchange',reveal);}
var bs=document.querySelectorAll('button.copy');
for(var c=0;c<bs.length;c++)bs[c].addEventListener('click',function(){var btn=this,
el=document.getElementById(btn.getAttribute('data-for')),txt=el.textContent,
rg=document.createRange(),sel=window.getSelection();rg.selectNodeContents(el);sel.removeAllRanges();sel.addRange(rg);
function done(ok){btn.textContent=ok?'copied':'selected: press Ctrl+C';}
function fallback(){var ok=false;try{ok=document.execCommand('copy');}catch(e){}done(ok);}
if(navigator.clipboard&&navigator.clipboard.writeText)
{navigator.clipboard.writeText(txt).then(function(){done(true);},fallback);}
else fallback();});
// Charts: each <figure class="plot" data-chart="{json}"> becomes an inline SVG. The numbers come
// from parity/report/html.py (which already picked bins, colours and tooltips); this only draws.
// The SVG namespace, as the HTML parser gives it (the page names no URL, not even a namespace's).
var NS=(function(){var d=document.createElement('div');d.innerHTML='<svg></svg>';return d.firstChild.namespaceURI;})(),SUP={'-':'\u207b','0':'\u2070','1':'\u00b9','2':'\u00b2','3':'\u00b3',
'4':'\u2074','5':'\u2075','6':'\u2076','7':'\u2077','8':'\u2078','9':'\u2079'};
function pow10(k){if(k===0)return '1';if(k===1)return '10';
return '10'+String(k).split('').map(function(c){return SUP[c];}).join('');}
function el(parent,tag,attrs,text){var e=document.createElementNS(NS,tag);
for(var a in attrs)if(attrs[a]!==null&&attrs[a]!==undefined)e.setAttribute(a,attrs[a]);
if(text!==undefined&&text!==null)e.textContent=text;if(parent)parent.appendChild(e);return e;}
function tip(e,text){if(text)el(e,'title',{},text);return e;}
function num(v){return v==='inf'?Infinity:v==='-inf'?-Infinity:v==='nan'||v===null?NaN:v;}
function frame(svg,w,h,m,xr,yr){var f={x0:m[0],x1:w-m[1],y0:h-m[3],y1:m[2],xr:xr,yr:yr,svg:svg,w:w,h:h};
f.x=function(v){return f.x0+(v-xr[0])/(xr[1]-xr[0])*(f.x1-f.x0);};
f.y=function(v){v=Math.min(Math.max(v,yr[0]),yr[1]);return f.y0-(v-yr[0])/(yr[1]-yr[0])*(f.y0-f.y1);};
f.axes=function(xl,yl){el(svg,'line',{'class':'ax',x1:f.x0,y1:f.y0,x2:f.x1,y2:f.y0});
el(svg,'line',{'class':'ax',x1:f.x0,y1:f.y0,x2:f.x0,y2:f.y1});
el(svg,'text',{x:(f.x0+f.x1)/2,y:h-4,'text-anchor':'middle'},xl);
el(svg,'text',{transform:'translate(12 '+(f.y0+f.y1)/2+') rotate(-90)','text-anchor':'middle'},yl);};
f.decades=function(){var lo=Math.floor(yr[0]),hi=Math.ceil(yr[1]),s=Math.max(1,Math.ceil((hi-lo)/8));
for(var k=lo;k<=hi;k+=s){var y=f.y(k);el(svg,'line',{'class':'grid',x1:f.x0,y1:y,x2:f.x1,y2:y});
el(svg,'text',{x:f.x0-4,y:y+4,'text-anchor':'end'},pow10(k));}};
f.hline=function(v,label){var y=f.y(v);el(svg,'line',{'class':'tol',x1:f.x0,y1:y,x2:f.x1,y2:y});
el(svg,'text',{x:f.x1-2,y:y-3,'text-anchor':'end',fill:'#c62828'},label);};
return f;}
function logRange(vals,inc){var v=vals.filter(isFinite).concat(inc||[]);if(!v.length)return [-1,0];
var lo=Math.floor(Math.min.apply(null,v)),hi=Math.ceil(Math.max.apply(null,v));return [lo,hi>lo?hi:lo+1];}
function svgFor(fig,w,h,label){var s=el(null,'svg',{'class':'chart',width:w,height:h,viewBox:'0 0 '+w+' '+h,
role:'img','aria-label':label});fig.insertBefore(s,fig.firstChild);return s;}
var draw={
hist:function(fig,d){var s=svgFor(fig,460,230,d.label),bw=(d.hi-d.lo)/d.bars.length,
xlo=d.lo-(d.exact?2*bw:0),xhi=d.hi+(d.nonfinite?2*bw:0),f=frame(s,460,230,[52,12,18,44],[xlo,xhi],[0,d.top]);
function bar(a,b,c,colour,t){var x=f.x(a)+1,w=Math.max(f.x(b)-f.x(a)-2,1),y=f.y(c);
tip(el(s,'rect',{'class':'bar',x:x,y:y,width:w,height:f.y0-y,fill:colour}),t);
if(c&&w>=14)el(s,'text',{x:x+w/2,y:y-3,'text-anchor':'middle','font-size':9},c);}
for(var k=Math.ceil(d.lo);k<=Math.floor(d.hi);k++){var x=f.x(k);
el(s,'line',{'class':'grid',x1:x,y1:f.y0,x2:x,y2:f.y1});el(s,'text',{x:x,y:f.y0+14,'text-anchor':'middle'},pow10(k));}
d.bars.forEach(function(b){bar(b.a,b.b,b.count,b.colour,b.tip);});
if(d.exact){bar(xlo,xlo+bw,d.exact,'#bbbbbb',d.exact+' elements exactly equal');
el(s,'text',{x:f.x(xlo+bw/2),y:f.y0+14,'text-anchor':'middle'},'0');}
if(d.nonfinite){bar(xhi-bw,xhi,d.nonfinite,'#5e3c99',d.nonfinite+' elements non-finite (NaN/Inf)');
el(s,'text',{x:f.x(xhi-bw/2),y:f.y0+14,'text-anchor':'middle'},'NaN');}
if(d.log_atol!==null&&d.lo<=d.log_atol&&d.log_atol<=d.hi){var xa=f.x(d.log_atol);
el(s,'line',{'class':'tol',x1:xa,y1:f.y0,x2:xa,y2:f.y1-8});el(s,'text',{x:xa+3,y:f.y1-6,fill:'#c62828'},d.atol_label);}
el(s,'text',{x:f.x0-4,y:f.y1+4,'text-anchor':'end'},d.top);el(s,'text',{x:f.x0-4,y:f.y0+4,'text-anchor':'end'},'0');
f.axes('|actual \u2212 expected| (log scale)','elements');},
rows:function(fig,d){var s=svgFor(fig,460,180,d.label),n=d.bars.length,
yr=logRange(d.bars.map(function(b){return b.log;}),d.log_atol===null?[]:[d.log_atol]),
f=frame(s,460,180,[52,12,12,40],[0,n],yr);f.decades();
d.bars.forEach(function(b,i){if(b.log===null)return;var gap=n<=64?1:0,x=f.x(i)+gap,
w=Math.max(f.x(i+1)-f.x(i)-2*gap,0.5),y=b.log==='inf'?f.y1:f.y(b.log);
tip(el(s,'rect',{'class':'bar',x:x,y:y,width:w,height:f.y0-y,fill:b.colour}),b.tip);});
for(var i=0,st=Math.max(1,Math.ceil(n/16));i<n;i+=st)el(s,'text',{x:f.x(i+0.5),y:f.y0+13,'text-anchor':'middle'},i);
if(d.log_atol!==null)f.hline(d.log_atol,'atol');f.axes(d.xlabel,'max |\u0394|');},
growth:function(fig,d){var s=svgFor(fig,470,250,d.label),n=d.positions.length,vals=[];
d.series.forEach(function(se){se.points.forEach(function(p){vals.push(num(p.v));});});
var f=frame(s,470,250,[52,100,14,40],[-0.5,n-0.5],logRange(vals,d.tolerance?[0]:[]));f.decades();
d.positions.forEach(function(label,i){el(s,'text',{x:f.x(i),y:f.y0+14,'text-anchor':'middle'},label);});
if(d.tolerance)f.hline(0,'tolerance');
d.series.forEach(function(se){var path=[],last=-2;se.points.forEach(function(p){
path.push((p.x===last+1?'L':'M')+f.x(p.x).toFixed(1)+' '+f.y(num(p.v)).toFixed(1));last=p.x;});
el(s,'path',{d:path.join(' '),fill:'none',stroke:se.colour,'stroke-width':se.own?2:1});
if(se.own)se.points.forEach(function(p){var a=el(s,'a',{href:'#'+p.href}),v=num(p.v);
tip(el(a,'circle',{cx:f.x(p.x),cy:f.y(v),r:p.first?6:3,fill:v===-Infinity?'#fff':se.colour,
stroke:p.first?'#000':se.colour,'stroke-width':p.first?2:1}),p.tip);});});
d.legend.forEach(function(it,k){var y=f.y1+6+15*k;
el(s,'line',{x1:f.x1+10,y1:y,x2:f.x1+28,y2:y,stroke:it[0],'stroke-width':2});el(s,'text',{x:f.x1+32,y:y+4},it[1]);});
f.axes('layer',d.ylabel+' (log)');}};
var figs=document.querySelectorAll('figure.plot');
for(var p=0;p<figs.length;p++){var d=JSON.parse(figs[p].getAttribute('data-chart'));draw[d.kind](figs[p],d);}
})();
